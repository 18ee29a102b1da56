"""`--method auto`: the strongest attack that applies to what the attacker saw.

The choice follows from the observation alone (the model, the schedule, the
batch size), never from the victim:

1. A FedAvg update of one step on the whole batch *is* a FedSGD gradient:
   ``-update / local_lr``.  It is attacked as one.
2. An update of several local steps: Inverting Gradients, the one attack here
   that unrolls the client's local training.
3. A gradient of a model with piecewise-linear parts (ReLU, max-pooling):
   Inverting Gradients.  L-BFGS gradient matching (DLG, iDLG) needs a
   twice-differentiable model: through a ReLU the matching loss is piecewise
   quadratic and its curvature is blind to where the kinks move, so the
   line search stalls.
4. A gradient of a smooth model (Sigmoid or Tanh activations, as the papers
   build theirs): gradleak's improved iDLG.  It reads the labels from the
   last layer, starts from the closed-form input where the layer structure
   allows it (one example of a Sigmoid conv chain, `analytic.py`) and
   finishes with L-BFGS matching in float64 with restarts.  Measured on
   iDLG's LeNet and CIFAR-100 images (README): 72-107 dB in 2.4-3.5 s per
   image, against 9-18 dB in 158-184 s for Inverting Gradients at 15,000
   steps on the same victims.

The label rules each attack uses are in `labels.py` and `inverting.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from gradleak.attacks.analytic import sigmoid_conv_chain
from gradleak.attacks.dlg import IDLG, AttackConfig, GradientInversion
from gradleak.attacks.inverting import IGConfig, InvertingGradients
from gradleak.models.user import normalization_of
from gradleak.types import Observation, UpdateObservation

__all__ = ["Choice", "choose_attack", "piecewise_linear_layers"]

# Layers through which the gradient's own gradient in the input is blind to curvature.
_PIECEWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Hardtanh,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool2d,
)


@dataclass(frozen=True)
class Choice:
    """The attack picked, what it runs on, and why, in a sentence.

    Attributes:
        attack: The configured attack; call it as ``choice.attack(choice.observation, seed=...)``.
        method: Its short name: "idlg" (improved) or "ig".
        observation: What the attack runs on: the observation given, or the
            FedSGD gradient a one-step update amounts to.
        reason: One sentence naming the attack and why it was picked.
    """

    attack: GradientInversion | InvertingGradients
    method: str
    observation: Observation | UpdateObservation
    reason: str


_SMOOTH = (nn.Sigmoid, nn.Tanh, nn.Softplus, nn.SiLU, nn.GELU, nn.ELU, nn.Mish)


def smooth_layers(model: nn.Module) -> list[str]:
    """The names of the model's smooth activation modules (Sigmoid, Tanh, ...)."""
    return [name for name, m in model.named_modules() if isinstance(m, _SMOOTH)]


def piecewise_linear_layers(model: nn.Module) -> list[str]:
    """The names of the model's layers that are piecewise linear (ReLU, max-pooling)."""
    return [name for name, m in model.named_modules() if isinstance(m, _PIECEWISE)]


def choose_attack(
    observation: Observation | UpdateObservation,
    *,
    iterations: int | None = None,
    ig: IGConfig | None = None,
) -> Choice:
    """Pick the strongest attack for `observation` (see the module docstring).

    Args:
        observation: A FedSGD gradient or a FedAvg update.
        iterations: Optimiser steps for the attack picked; None for its own default.
        ig: Inverting Gradients' config when it is picked (its `iterations`
            is replaced by `iterations` when that is given).

    Returns:
        The attack, the observation to run it on and the reason.
    """
    if isinstance(observation, UpdateObservation):
        linear_first_step = observation.optimizer.kind == "sgd" and not (
            observation.optimizer.nesterov or observation.optimizer.weight_decay
        )  # its first step is -lr x the gradient (momentum starts at the gradient itself)
        if (
            observation.steps == 1
            and observation.batch_size == observation.num_examples
            and linear_first_step
        ):
            gradient = one_step_gradient(observation)
            choice = choose_attack(gradient, iterations=iterations, ig=ig)
            reason = f"one local step on the whole batch sends -lr x the gradient; {choice.reason}"
            return Choice(choice.attack, choice.method, gradient, reason)
        return Choice(
            _inverting(ig, iterations),
            "ig",
            observation,
            f"Inverting Gradients: {observation.steps} local steps "
            f"({observation.optimizer.describe()}) sent an update, "
            "which only an attack that unrolls the client's training can match",
        )
    kinks = piecewise_linear_layers(observation.model)
    if not kinks and not smooth_layers(observation.model):
        return Choice(
            _inverting(ig, iterations),
            "ig",
            observation,
            "Inverting Gradients: the model has no Sigmoid or Tanh layer among its modules, so "
            "its activations are called as functions (F.relu, ...), which cannot be seen: "
            "taken as piecewise linear, through which L-BFGS gradient matching stalls",
        )
    if kinks:
        return Choice(
            _inverting(ig, iterations),
            "ig",
            observation,
            f"Inverting Gradients: the model has piecewise-linear layers ({kinks[0]}, "
            f"{type(observation.model.get_submodule(kinks[0])).__name__}), through which "
            "L-BFGS gradient matching stalls",
        )
    # The closed form solves for what the first layer sees; under a normalisation that is
    # not the image, so it is left out there.
    normalised = normalization_of(observation.model) is not None
    config = AttackConfig(improved=True, warm_start="none" if normalised else "auto")
    if iterations is not None:
        config = replace(config, iterations=iterations)
    closed_form = (
        not normalised
        and observation.batch_size == 1
        and sigmoid_conv_chain(observation) is not None
    )
    start = (
        "a closed-form start from the layer structure"
        if closed_form
        else "a mid-grey start (the closed form needs one example of a sigmoid conv chain "
        "fed raw pixels)"
    )
    labels = "iDLG's rule" if observation.batch_size == 1 else "the batch label rule"
    return Choice(
        IDLG(config),
        "idlg",
        observation,
        f"improved iDLG: a smooth model, so labels by {labels}, {start}, then L-BFGS "
        "gradient matching in float64",
    )


def one_step_gradient(observation: UpdateObservation) -> Observation:
    """The FedSGD gradient a one-step, whole-batch update amounts to: ``-update / lr``."""
    return Observation(
        model=observation.model,
        gradients=tuple(-u / observation.local_lr for u in observation.update),
        parameter_names=observation.parameter_names,
        input_shape=observation.input_shape,
        num_classes=observation.num_classes,
        batch_size=observation.num_examples,
        batchnorm=observation.batchnorm,
    )


def _inverting(config: IGConfig | None, iterations: int | None) -> InvertingGradients:
    config = config or IGConfig()
    if iterations is not None:
        return InvertingGradients(config, iterations=iterations)
    return InvertingGradients(config)
