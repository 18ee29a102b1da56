"""Inverting Gradients (Geiping, Bauermeister, Droege, Moeller; NeurIPS 2020).

https://arxiv.org/abs/2003.14053.  The attack rebuilds the client's images by
making the *direction* of the dummy batch's gradient match the shared one: it
minimises one minus the cosine similarity of the two (every layer's gradient
flattened into one vector) plus a total-variation prior on the images, with
Adam on the sign of the objective's gradient, a step-decayed step size and the
pixels projected back into [0, 1] after every step.  That is `IGConfig.paper()`;
gradleak's default (`IGConfig()`) stops at a plateau of the objective and adds
BatchNorm-statistics priors (`ig_schedule.py`; README, "Inverting Gradients'
defaults").

Two threat models, one optimiser:

* FedSGD (`Observation`): the dummy's gradient is that of the mean
  cross-entropy of the model on the dummy batch with the labels.  The replay
  runs the model in train mode, as a client trains (gradleak's models are
  built in train mode, and `threat.observe` runs the model in the mode it
  has), so BatchNorm normalises with the dummy batch's own statistics, as the
  client's did with its batch's.  The replay works on a private copy of the
  model with private copies of its buffers, so the attacker's model (and its
  running statistics) is left as it was.
* FedAvg (`UpdateObservation`): the attacker unrolls the client's local SGD on
  the dummy batch, differentiably (`torch.func.functional_call` with the
  weights as tensors that carry the graph), from the weights it sent, with the
  schedule it configured (learning rate, K steps or E epochs, mini-batches of
  `local_batch`), BatchNorm in train mode and its running statistics carried
  from step to step as the client's are, and matches the simulated update
  (returned - sent) to the observed one.  The client's shuffled order of its
  examples is secret; the attacker uses a fixed order of its own dummies
  (`attacker_batches`): every epoch the consecutive slices 0..b-1, b..2b-1, ...
  of the dummy batch, in order (breaching's FedAvg attack does the same); with
  `local_steps` K the first K slices of that repeating sequence.  The dummy
  examples are free variables, so within one epoch a fixed order loses
  nothing: whichever order the client drew, the same update comes from the
  dummies relabelled.  Over several epochs it is an approximation: the client
  reshuffles, so which examples share a mini-batch changes from epoch to
  epoch while the attacker's pairing stays the same.  Without BatchNorm the
  pairing enters only through the weights' drift within the round (second
  order in the learning rate); with BatchNorm also through the batch
  statistics.

Labels (never known to the attacker unless the caller passes them): for one
example iDLG's rule on the last Linear layer's weight gradient
(`labels.idlg_label`), for a batch the label-count rule on its bias gradient
(`labels.batch_labels`).  For a FedAvg update the same rules read
``-update / (local_lr * K)``, the mean over the K local steps of each step's
mini-batch gradient.  Why that stays approximately valid: the last layer's bias
update is ``-lr * sum_k g_k`` with ``g_k[c] = (S_k[c] - n_k[c]) / b`` the mean
of ``p - y`` over step k's mini-batch (S_k the softmax mass the model at step k
puts on class c, n_k the count of c in the mini-batch).  When every step has b
examples and every example is seen E times (whole epochs, K * b = E * n),
``sum_k g_k / K = (S_bar[c] - n[c]) / n`` with S_bar the softmax mass summed
over the n examples and averaged over the epochs: exactly the shape of a mean
FedSGD gradient over n examples, so the sign rule (a present class is the one
the model under-predicts) and the counts ``n (S - g)`` carry over with the
count normalised by the K steps.  What is not exact is that the weights move
during the round, so S changes from step to step; with a small learning rate
and few steps it barely does.  With a schedule in which the examples are seen
unequally often (K not a multiple of ceil(n / b), or a short last mini-batch)
the rule is an estimate only; with K * b < n some examples are never seen and
their labels cannot be read.

The counts need the model's mean softmax over the round (``labels.py``
estimates it from the last layer); for K > 1 steps the attacker evaluates the
last layer at ``sent + (K - 1) / (2K) * update``, the mean of the weights at
which the K steps took their gradients if the weights move evenly, rather than
at the sent weights: the steps' gradients were not all taken there.

Measured: how often the label multiset is exact, over 50 seeded batches of 4
test images per cell (a fresh untrained model per batch, seeded per batch;
"distinct" labels, or "repeated": at least one label twice), for one step on
the whole batch (the same at every lr: it reads -lr times the FedSGD
gradient) and for 2 epochs of mini-batches of 2 (4 steps, the client's order
shuffled by its seed) at three local learning rates.  Models: the papers'
Sigmoid ones as the registry builds them (``lenet``, iDLG's strided LeNet;
``resnet20``, DLG's stride-free ResNet-20, with BatchNorm) and the registry's
ReLU + BatchNorm ``convnet`` at width 16.  Command: ``.venv/bin/python tools/ig_label_rule.py
--batches 50`` (1 min 44 s on 1 CPU thread):

    | model    | data     | labels   | K=1 | 2 ep, lr 0.001 | lr 0.01 | lr 0.1 |
    |----------|----------|----------|-----|----------------|---------|--------|
    | lenet    | mnist    | distinct | 50  | 50             | 34      | 8      |
    | lenet    | mnist    | repeated | 50  | 50             | 24      | 22     |
    | lenet    | cifar100 | distinct | 50  | 50             | 49      | 21     |
    | lenet    | cifar100 | repeated | 50  | 50             | 37      | 9      |
    | resnet20 | cifar100 | distinct | 50  | 50             | 50      | 50     |
    | resnet20 | cifar100 | repeated | 50  | 50             | 50      | 42     |
    | convnet  | cifar100 | distinct | 50  | 50             | 40      | 3      |
    | convnet  | cifar100 | repeated | 50  | 49             | 6       | 16     |

(out of 50 each).  The rule is exact for one step and holds at a small local
lr; it fails as the weights move further within the round, first on repeated
labels (the counts) and on the LeNet, whose iDLG init (weights uniform in
[-0.5, 0.5] over 588 Sigmoid features) moves its logits by O(1) per step at
lr 0.01.  Evaluated at the sent weights instead, the 2-epoch lr 0.01 cells
were lower (LeNet/MNIST 29 and 8, LeNet/CIFAR-100 repeated 22, ConvNet
repeated 0).  The test ``test_update_label_rule_is_exact_on_distinct_labels``
asserts the LeNet/MNIST distinct-label cells at lr 0.001 on the first 8 of
those seeded batches.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gradleak.attacks.dlg import StepCallback, require_nonzero_gradient
from gradleak.attacks.ig_schedule import BatchNormStatistics, Plateau
from gradleak.attacks.labels import (
    batch_labels,
    idlg_label,
    update_as_gradient,
    update_label_counts,
)
from gradleak.attacks.threads import attack_threads
from gradleak.attacks.unroll import FunctionalOptimizer
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.types import (
    ClientOptimizer,
    Observation,
    Reconstruction,
    Snapshot,
    UpdateObservation,
)

__all__ = [
    "IGConfig",
    "InvertingGradients",
    "attacker_batches",
    "cosine_distance",
    "simulate_update",
    "total_variation",
    "update_labels",
]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class IGConfig:
    """Inverting Gradients: Geiping et al., "Inverting Gradients - How easy is it to
    break privacy in federated learning?", NeurIPS 2020, https://arxiv.org/abs/2003.14053.

    The defaults are gradleak's, measured to reach the paper's picture in far
    fewer steps on a CPU (README, "Inverting Gradients' defaults"): at most
    ``iterations`` steps, stopped by the plateau rule (`ig_schedule.Plateau`),
    and a BatchNorm-statistics prior (`ig_schedule.BatchNormStatistics`) that
    pins what train-mode BatchNorm hides.  `IGConfig.paper()` is the paper's
    attack as the breaching framework configures it
    (``attack/invertinggradients.yaml``): cosine objective, Adam with the hard
    sign of the gradient, step 0.1 with step decay, boxed pixels, 24,000
    iterations, total variation 0.2, no other prior.

    The objective is ``cosine_distance(dummy, observed) + tv_scale * TV(x)
    + priors``:

    * ``cosine_distance`` is ``1 - <a, b> / (|a| |b|)`` with every layer's
      gradient (FedSGD) or update (FedAvg) flattened and concatenated into one
      vector, every layer weighted alike (no per-layer weights).
    * ``TV(x)`` is ``mean |x[..., :, 1:] - x[..., :, :-1]| + mean |x[..., 1:, :]
      - x[..., :-1, :]|``: the mean absolute horizontal difference plus the
      mean absolute vertical one, each mean over all its differences (batch,
      channels, positions), no padding.  That is breaching's "mean of dx plus
      mean of dy" (its scale 0.2 is the old repository's 0.1 on a sum);
      breaching computes the differences by a padded convolution, which adds
      the border differences to the means.
    * ``BN(x)`` is the distance of a BatchNorm layer's input statistics on
      the dummy batch to its running statistics (`ig_schedule`): the first
      layer's in train mode (``bn_prior``), every layer's in either mode for
      a batch (``feature_prior``).

    Attributes:
        iterations: Optimiser steps per trial: the cap with the plateau
            schedule, the exact count with the step schedule (paper /
            breaching: 24,000).
        lr: Adam's step size (0.1).
        tv_scale: Weight of the total-variation prior (0.2).
        lr_decay: With the step schedule, multiply the step size by 0.1 after
            3/8, 5/8 and 7/8 of the iterations (the paper's code's schedule).
        schedule: "plateau" (gradleak's: cut the step size by 10 when the
            objective plateaus, stop at the plateau after ``decays`` cuts, or
            at ``iterations``) or "step" (the paper's: all ``iterations``
            steps, step decay as ``lr_decay`` says).
        window: The plateau rule's window, in steps.
        plateau_rtol: A window that lowers the best objective by less than
            this share of it is a plateau.
        decays: Step-size cuts before a plateau ends the run.
        bn_prior: In train mode only: weight of the first BatchNorm layer's
            statistics prior, which pins each input channel's scale and shift
            that train-mode BatchNorm hides from the gradient (0: none, the
            paper's).  In eval mode the gradient sees them and it is not used.
        feature_prior: For batches of 2 or more only: weight of GradInversion's
            prior on every BatchNorm layer's statistics, in either mode (0:
            none).  One image's statistics are a poor sample of the data's,
            and on one image it did not help (README).
        restarts: Fresh random starts after the first; the trial with the
            lowest final matching loss (the cosine distance alone, without the
            prior) is kept.  breaching's configuration runs one trial
            (``num_trials: 1``), so the default is 0; the paper uses several
            restarts in some experiments.
        parallel: Trials run at once, each on its own thread with its own copy
            of the model (1: one after another).  Every trial's start is drawn
            before any runs, in trial order, so the result is the sequential
            one bit for bit; with ``restarts=1, parallel=2`` a second start
            costs a second core rather than a second run's time.
        init: Where the dummies start: "randn" (standard normal, the paper's;
            the first projection boxes it into [0, 1]) or "midgray" (0.5 plus
            normal noise of std 0.01: a constant start would give equal
            dummies of equal labels equal gradients forever).
        signed: Step on the sign of the objective's gradient (the paper's) or
            on the gradient itself.
        labels: "infer" (the label rules, see the module docstring) or
            "given" (the caller must pass ``labels=``).  Labels passed to the
            call are used in either case.
        dtype: "float32" (the paper's) or "float64": the attacker may compute in
            higher precision than the client did.
        snapshot_every: Keep the dummy inputs every this many steps.
        tolerance: A trial has converged when its final matching loss (the
            cosine distance) is below this; gradleak's choice, the paper has
            no stopping rule (the attack runs all its iterations regardless).
    """

    iterations: int = 1_000
    lr: float = 0.1
    tv_scale: float = 0.2
    lr_decay: bool = True
    schedule: str = "plateau"
    window: int = 50
    plateau_rtol: float = 0.01
    decays: int = 2
    bn_prior: float = 0.1
    feature_prior: float = 0.1
    restarts: int = 0
    parallel: int = 1
    init: str = "randn"
    signed: bool = True
    labels: str = "infer"
    dtype: str = "float32"
    snapshot_every: int = 500
    tolerance: float = 1e-4

    @classmethod
    def paper(cls, **overrides: object) -> IGConfig:
        """The paper's attack as breaching configures it: 24,000 signed Adam steps, step decay."""
        settings: dict[str, object] = dict(
            iterations=24_000,
            lr=0.1,
            tv_scale=0.2,
            lr_decay=True,
            schedule="step",
            bn_prior=0.0,
            feature_prior=0.0,
            init="randn",
            signed=True,
        )
        settings.update(overrides)
        return cls(**settings)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        for name in ("iterations", "restarts", "parallel", "window", "decays"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value:
                raise ConfigError(f"{name} must be a whole number, got {value!r}")
        if self.iterations < 1:
            raise ConfigError(f"iterations must be at least 1, got {self.iterations}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"lr must be finite and above 0, got {self.lr!r}")
        if not math.isfinite(self.tv_scale) or self.tv_scale < 0:
            raise ConfigError(f"tv_scale must be finite and 0 or more, got {self.tv_scale!r}")
        for name in ("bn_prior", "feature_prior"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be finite and 0 or more, got {value!r}")
        if self.restarts < 0:
            raise ConfigError(f"restarts must be 0 or more, got {self.restarts}")
        if self.parallel < 1:
            raise ConfigError(f"parallel must be 1 or more, got {self.parallel}")
        if self.window < 1 or self.decays < 0:
            raise ConfigError(
                f"window must be 1 or more and decays 0 or more, got {self.window}, {self.decays}"
            )
        if not (math.isfinite(self.plateau_rtol) and 0 <= self.plateau_rtol < 1):
            raise ConfigError(f"plateau_rtol must lie in [0, 1), got {self.plateau_rtol!r}")
        if self.schedule not in ("plateau", "step"):
            raise ConfigError(f"schedule must be plateau or step, not {self.schedule!r}")
        if self.init not in ("randn", "midgray"):
            raise ConfigError(f"init must be randn or midgray, not {self.init!r}")
        if self.labels not in ("infer", "given"):
            raise ConfigError(f"labels must be infer or given, not {self.labels!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be float32 or float64, not {self.dtype!r}")
        if self.snapshot_every < 1:
            raise ConfigError(f"snapshot_every must be at least 1, got {self.snapshot_every}")
        if not self.tolerance >= 0:
            raise ConfigError(f"tolerance must be 0 or more, got {self.tolerance!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The floating-point type the attack computes in."""
        return _DTYPES[self.dtype]

    @property
    def milestones(self) -> tuple[int, ...]:
        """The steps after which the step schedule multiplies the step size by 0.1."""
        if not self.lr_decay or self.schedule != "step":
            return ()
        n = self.iterations
        return ((3 * n) // 8, (5 * n) // 8, (7 * n) // 8)

    def initial_inputs(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Draw the dummies' starting point (on the CPU, in float32)."""
        noise = torch.randn(shape, generator=generator)
        return 0.5 + 0.01 * noise if self.init == "midgray" else noise


# --- the pieces of the objective --------------------------------------------------------------


def cosine_distance(
    dummy: Sequence[torch.Tensor], observed: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``1 - cos(dummy, observed)``, every tensor flattened into one vector (0 to 2)."""
    dot = sum((d * o).sum() for d, o in zip(dummy, observed, strict=True))
    dummy_norm = torch.sqrt(sum((d * d).sum() for d in dummy))
    observed_norm = torch.sqrt(sum((o * o).sum() for o in observed))
    return 1 - dot / (dummy_norm * observed_norm).clamp_min(1e-30)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean |horizontal difference| plus mean |vertical difference| (see `IGConfig`).

    ``x`` is ``(batch, *input_shape)``; the differences run along the last two
    axes of each example (the last one only, for examples of one axis).
    """
    tv = x.new_zeros(())
    if x.dim() >= 2 and x.shape[-1] > 1:
        tv = tv + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    if x.dim() >= 3 and x.shape[-2] > 1:
        tv = tv + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return tv


# --- the replay of the client ---------------------------------------------------------------


class _Replica:
    """A private copy of the model, in the client's mode, and float copies of its weights.

    ``forward(tensors, x)`` runs the copy with the given weights; buffers are
    copied for every forward, so BatchNorm's running statistics never leak
    from one evaluation into the next nor into the attacker's model.
    """

    def __init__(
        self,
        model: nn.Module,
        state: dict[str, torch.Tensor],
        trainable: Sequence[str],
        dtype: torch.dtype,
        device: torch.device,
        *,
        train: bool = True,
    ) -> None:
        self.module = copy.deepcopy(model).train(train)
        parameter_names = {name for name, _ in self.module.named_parameters()}
        self.names = tuple(trainable)
        self.parameters: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            t = tensor.detach().to(device)
            if t.is_floating_point():
                t = t.to(dtype)
            if name in parameter_names:
                self.parameters[name] = t.clone().requires_grad_(name in self.names)
            else:
                self.buffers[name] = t.clone()
        missing = [name for name in self.names if name not in self.parameters]
        if missing:
            raise AttackNotApplicable(
                f"the observation names parameters the model does not have ({missing[0]}); "
                "give the observation of this model"
            )

    def fresh_buffers(self) -> dict[str, torch.Tensor]:
        return {name: b.clone() for name, b in self.buffers.items()}

    def forward(
        self, parameters: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        return functional_call(self.module, {**parameters, **buffers}, (x,))


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    return state


def dummy_gradient(
    replica: _Replica, x: torch.Tensor, y: torch.Tensor, *, create_graph: bool = True
) -> tuple[torch.Tensor, ...]:
    """FedSGD: the gradient of the mean cross-entropy on ``(x, y)``, graph kept for ``x``."""
    logits = replica.forward(replica.parameters, replica.fresh_buffers(), x)
    loss = F.cross_entropy(logits, y)
    targets = [replica.parameters[name] for name in replica.names]
    return tuple(torch.autograd.grad(loss, targets, create_graph=create_graph))


def attacker_batches(
    num_examples: int, batch_size: int, steps: int, *, drop_last: bool = False
) -> list[torch.Tensor]:
    """The attacker's fixed mini-batch order: consecutive slices of ``0..n-1``, every epoch.

    Step k takes slice ``k mod ceil(n / b)``; the last slice of an epoch is
    shorter when b does not divide n (as the client's are), or left out with
    `drop_last` (the dummies past the last full slice then never enter the
    update, as the client's dropped examples did not in that epoch).
    """
    order = torch.arange(num_examples)
    end = num_examples - num_examples % batch_size if drop_last else num_examples
    epoch = [order[start : start + batch_size] for start in range(0, end, batch_size)]
    return [epoch[k % len(epoch)] for k in range(steps)]


def simulate_update(
    replica: _Replica,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    batches: Sequence[torch.Tensor],
    create_graph: bool = True,
    optimizer: ClientOptimizer | None = None,
) -> tuple[torch.Tensor, ...]:
    """FedAvg: the client's local training on ``(x, y)``, unrolled; returns ``returned - sent``.

    Args:
        replica: The model and the weights sent.
        x: The examples, ``(n, *input_shape)``.
        y: Their labels, ``(n,)``.
        lr: The local learning rate.
        batches: The indices of each step's mini-batch, in order (the attack
            uses `attacker_batches`; a test passes the client's own order).
        create_graph: Keep the graph so the update can be differentiated in ``x``.
        optimizer: The client's optimiser (`attacks.unroll`); None for plain SGD.

    Returns:
        One tensor per trainable parameter, in the order of ``replica.names``.
    """
    start = {name: replica.parameters[name] for name in replica.names}
    parameters = dict(replica.parameters)
    buffers = replica.fresh_buffers()  # the running statistics carried from step to step
    stepper = FunctionalOptimizer(optimizer or ClientOptimizer(), lr)
    for indices in batches:
        index = indices.to(x.device)
        logits = replica.forward(parameters, buffers, x[index])
        loss = F.cross_entropy(logits, y[index])
        targets = [parameters[name] for name in replica.names]
        grads = torch.autograd.grad(loss, targets, create_graph=create_graph)
        moved = stepper.step(
            {name: parameters[name] for name in replica.names},
            dict(zip(replica.names, grads, strict=True)),
        )
        parameters.update(moved)
    return tuple(parameters[name] - start[name] for name in replica.names)


# --- labels ---------------------------------------------------------------------------------


def update_labels(observation: UpdateObservation) -> torch.Tensor:
    """The labels of a FedAvg client, from its update (`labels.update_label_counts`,
    checked by fitting the examples' logits).

    Returns:
        ``(num_examples,)`` labels, ascending (a multiset) for several examples.
    """
    if observation.num_examples == 1:
        return torch.tensor(
            [idlg_label(_pseudo_observation(observation))], device=observation.device
        )
    counts = update_label_counts(observation, fit_logits=True)
    classes = torch.arange(len(counts), device=counts.device)
    return torch.repeat_interleave(classes, counts).to(observation.device)


def _pseudo_observation(observation: UpdateObservation) -> Observation:
    """The update as a mean FedSGD gradient over the client's examples (`labels.py`)."""
    return update_as_gradient(observation)


def _check_labels(labels: torch.Tensor, count: int, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ConfigError(f"labels must be integer class indices, got {labels.dtype}")
    labels = labels.reshape(-1).long()
    if labels.numel() != count:
        raise ConfigError(f"give one label per example: {count} examples, {labels.numel()} labels")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ConfigError(f"labels must lie in 0..{num_classes - 1}, got {labels.tolist()}")
    return labels


# --- the attack -----------------------------------------------------------------------------


class InvertingGradients:
    """Inverting Gradients (Geiping et al., NeurIPS 2020): configure once, call on observations.

    https://arxiv.org/abs/2003.14053.  ``InvertingGradients(config)(observation,
    seed=..., labels=None, callback=None)`` attacks an `Observation` (FedSGD)
    or an `UpdateObservation` (FedAvg) and returns a `Reconstruction`:
    ``inputs`` ``(B, *input_shape)`` in [0, 1] (boxed), ``labels`` ``(B,)``
    (ascending when inferred for a batch: which example has which label cannot
    be read from the last layer), ``loss_history`` (the matching loss, the
    cosine distance without the prior, at the point each step started from,
    then once at each trial's final point), ``snapshots`` of the kept trial,
    ``steps`` and ``evaluations`` over all trials, ``restarts``, and
    ``converged`` (final matching loss below ``config.tolerance``).

    Args:
        config: An `IGConfig`; keyword overrides are applied on top of it
            (``InvertingGradients(iterations=500)``).
    """

    name = "ig"
    learns_labels = False

    def __init__(self, config: IGConfig | None = None, **overrides: object) -> None:
        self.config = dataclasses.replace(config or IGConfig(), **overrides)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def infer_labels(self, observation: Observation | UpdateObservation) -> torch.Tensor:
        """The labels the attack assumes: iDLG's rule, the batch rule, or their FedAvg form."""
        if isinstance(observation, UpdateObservation):
            return update_labels(observation)
        if observation.batch_size > 1:
            return batch_labels(observation, fit_logits=True)
        return torch.tensor([idlg_label(observation)], device=observation.device)

    def __call__(
        self,
        observation: Observation | UpdateObservation,
        *,
        seed: int = 0,
        labels: torch.Tensor | None = None,
        callback: StepCallback | None = None,
    ) -> Reconstruction:
        """Attack one observation.

        Args:
            observation: What the attacker saw: a FedSGD gradient or a FedAvg update.
            seed: Seed of the dummies' draws (equal seeds, equal results).
            labels: The client's labels, when the caller knows them; else
                inferred (``config.labels == "infer"``).
            callback: Called as ``callback(step, matching_loss)`` after every step.

        Raises:
            AttackNotApplicable: The gradient or update is all zeros, or no label
                rule applies.
            ConfigError: ``labels="given"`` without labels, or labels of the
                wrong shape or range.
        """
        config = self.config
        update = isinstance(observation, UpdateObservation)
        if update:
            count = observation.num_examples
            require_nonzero_gradient(
                _pseudo_observation(observation),
                hint="the client's weights did not move, so its examples left no trace",
            )
        else:
            count = observation.batch_size
            require_nonzero_gradient(observation)
        with attack_threads(observation.device):
            device, dtype = observation.device, config.torch_dtype
            if labels is not None:
                y = _check_labels(labels, count, observation.num_classes).to(device)
            elif config.labels == "given":
                raise ConfigError(
                    "this attack is configured with labels='given' but none were passed; "
                    "pass labels= or configure labels='infer'"
                )
            else:
                y = self.infer_labels(observation).to(device).long()
            train = observation.batchnorm == "train"
            if update:
                observed = tuple(u.detach().to(device, dtype) for u in observation.update)
                batches = attacker_batches(
                    count, observation.batch_size, observation.steps,
                    drop_last=observation.drop_last,
                )  # fmt: skip
                lr, client_optimizer = observation.local_lr, observation.optimizer

                def lane() -> _Lane:
                    replica = _Replica(
                        observation.model, observation.sent, observation.parameter_names,
                        dtype, device, train=train,
                    )  # fmt: skip

                    def produce(x: torch.Tensor, *, graph: bool) -> tuple[torch.Tensor, ...]:
                        return simulate_update(
                            replica, x, y, lr=lr, batches=batches, create_graph=graph,
                            optimizer=client_optimizer,
                        )  # fmt: skip

                    return _Lane(produce, _priors(replica, config, train=train, batch=count))
            else:
                observed = tuple(g.detach().to(device, dtype) for g in observation.gradients)

                def lane() -> _Lane:
                    replica = _Replica(
                        observation.model, _model_state(observation.model),
                        observation.parameter_names, dtype, device, train=train,
                    )  # fmt: skip

                    def produce(x: torch.Tensor, *, graph: bool) -> tuple[torch.Tensor, ...]:
                        return dummy_gradient(replica, x, y, create_graph=graph)

                    return _Lane(produce, _priors(replica, config, train=train, batch=count))

            # Every start is drawn before any trial runs, in trial order: the
            # same draws however many trials run at once.
            generator = torch.Generator().manual_seed(int(seed))
            shape = (count, *observation.input_shape)
            starts = [config.initial_inputs(shape, generator) for _ in range(config.restarts + 1)]
            trials = _run_trials(lane, observed, starts, config, device, callback)
            run = _Run()
            best: tuple[float, torch.Tensor, tuple[Snapshot, ...]] | None = None
            for trial, (loss, x, snapshots, counted) in enumerate(trials):
                run.steps += counted.steps
                run.evaluations += counted.evaluations
                run.history.extend(counted.history)
                if best is None or _better(loss, best[0]):
                    best = (loss, x, snapshots)
                run.restarts = trial
            assert best is not None
            loss, x, snapshots = best
            shared = observation.update if update else observation.gradients
            return Reconstruction(
                inputs=x.detach().to(shared[0].dtype),
                labels=y.detach().reshape(-1),
                loss_history=tuple(run.history),
                snapshots=snapshots,
                steps=run.steps,
                evaluations=run.evaluations,
                restarts=run.restarts,
                converged=math.isfinite(loss) and loss < config.tolerance,
            )


@dataclasses.dataclass
class _Run:
    """Counters over all trials."""

    steps: int = 0
    evaluations: int = 0
    restarts: int = 0
    history: list[float] = dataclasses.field(default_factory=list)


Producer = Callable[..., tuple[torch.Tensor, ...]]
Trial = tuple[float, torch.Tensor, tuple[Snapshot, ...], _Run]


@dataclasses.dataclass
class _Lane:
    """What one thread of trials needs to itself: its model copy's objective and priors."""

    produce: Producer
    statistics: list[tuple[BatchNormStatistics, float]]

    def close(self) -> None:
        for prior, _ in self.statistics:
            prior.close()


def _run_trials(
    lane: Callable[[], _Lane],
    observed: tuple[torch.Tensor, ...],
    starts: Sequence[torch.Tensor],
    config: IGConfig,
    device: torch.device,
    callback: StepCallback | None,
) -> list[Trial]:
    """Every trial from its start, `config.parallel` at a time; results in trial order.

    Each thread gets its own lane: the BatchNorm priors hook the model copy,
    so two trials must never share one.  A trial computes exactly what it
    computes alone (one intra-op thread each, its own counters), so the
    results are the sequential ones bit for bit.  The callback sees every
    trial's steps, numbered across all trials, one call at a time.
    """
    if config.parallel == 1 or len(starts) == 1:
        shared = _Run()  # the callback's step numbers run on across trials
        results = []
        current = lane()
        try:
            for start in starts:
                mark = (shared.steps, shared.evaluations, len(shared.history))
                loss, x, snapshots = _trial(
                    current.produce, observed, start, config, device, shared, callback,
                    current.statistics,
                )  # fmt: skip
                counted = _Run(
                    steps=shared.steps - mark[0],
                    evaluations=shared.evaluations - mark[1],
                    history=shared.history[mark[2] :],
                )
                results.append((loss, x, snapshots, counted))
        finally:
            current.close()
        return results
    lock = threading.Lock()
    total = [0]
    told = None
    if callback is not None:
        # One call at a time, numbered across the trials; `on_inputs` too.
        def told(step: int, loss: float) -> None:
            with lock:
                callback(total[0], loss)
                total[0] += 1

        preview = getattr(callback, "on_inputs", None)
        if preview is not None:

            def shown(step: int, x: torch.Tensor) -> None:
                with lock:
                    preview(total[0], x)

            told.on_inputs = shown  # type: ignore[attr-defined]
    lanes: queue.SimpleQueue[_Lane] = queue.SimpleQueue()
    made = [lane() for _ in range(min(config.parallel, len(starts)))]
    for item in made:
        lanes.put(item)
    threads = torch.get_num_threads()

    def one(start: torch.Tensor) -> Trial:
        torch.set_num_threads(threads)  # a new thread: the attack's thread count
        current = lanes.get()
        try:
            counted = _Run()
            loss, x, snapshots = _trial(
                current.produce, observed, start, config, device, counted, told,
                current.statistics,
            )  # fmt: skip
            return loss, x, snapshots, counted
        finally:
            lanes.put(current)

    try:
        with ThreadPoolExecutor(max_workers=len(made), thread_name_prefix="ig-trial") as pool:
            return list(pool.map(one, starts))
    finally:
        for item in made:
            item.close()


PREVIEW_EVERY = 25  # steps between the dummies shown to a callback's ``on_inputs``


def _trial(
    produce: Producer,
    observed: tuple[torch.Tensor, ...],
    start: torch.Tensor,
    config: IGConfig,
    device: torch.device,
    run: _Run,
    callback: StepCallback | None,
    statistics: Sequence[tuple[BatchNormStatistics, float]] = (),
) -> tuple[float, torch.Tensor, tuple[Snapshot, ...]]:
    """One trial from `start` (a fresh draw): (signed) Adam, boxed, until the schedule ends it.

    A callback with an ``on_inputs(step, x)`` method is also shown the dummies
    every ``PREVIEW_EVERY`` steps (the CLI's bar shows their PSNR where it
    knows the truth).
    """
    # Drawn on the CPU so that a seed means the same start on every device.
    x = start.to(device, config.torch_dtype)
    x.requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimiser, milestones=list(config.milestones), gamma=0.1
    )
    plateau = (
        Plateau(optimiser, window=config.window, rtol=config.plateau_rtol, decays=config.decays)
        if config.schedule == "plateau"
        else None
    )
    preview = getattr(callback, "on_inputs", None)
    snapshots = [Snapshot(0, x.detach().cpu().clone())]
    step = 0
    with torch.enable_grad():
        for step in range(1, config.iterations + 1):
            with contextlib.ExitStack() as stack:
                for prior, _ in statistics:
                    stack.enter_context(prior.recording())
                matching = cosine_distance(produce(x, graph=True), observed)
            objective = matching + config.tv_scale * total_variation(x)
            for prior, weight in statistics:
                penalty = prior.penalty()
                if penalty is not None:
                    objective = objective + weight * penalty
            (grad,) = torch.autograd.grad(objective, [x])
            x.grad = grad.sign() if config.signed else grad
            optimiser.step()
            scheduler.step()
            with torch.no_grad():
                x.clamp_(0.0, 1.0)
            value = float(matching.detach())
            run.history.append(value)
            if callback is not None:
                callback(run.steps, value)  # as DLG: steps taken before this one
            run.steps += 1
            run.evaluations += 1
            if step % config.snapshot_every == 0:
                snapshots.append(Snapshot(step, x.detach().cpu().clone()))
            if preview is not None and step % PREVIEW_EVERY == 0:
                preview(run.steps, x.detach())
            if plateau is not None and plateau.update(float(objective.detach())):
                break
        # The last step moved the point without evaluating it there.
        final = float(cosine_distance(produce(x, graph=False), observed).detach())
    run.evaluations += 1
    run.history.append(final)
    return final, x.detach().clone(), tuple(snapshots)


def _priors(
    replica: _Replica, config: IGConfig, *, train: bool, batch: int
) -> list[tuple[BatchNormStatistics, float]]:
    """The BatchNorm-statistics priors this config asks for in this mode, with their weights."""
    priors = []
    if train and config.bn_prior > 0:
        priors.append(
            (BatchNormStatistics(replica.module, replica.buffers, "first"), config.bn_prior)
        )
    if batch > 1 and config.feature_prior > 0:
        priors.append(
            (BatchNormStatistics(replica.module, replica.buffers, "all"), config.feature_prior)
        )
    return [(prior, weight) for prior, weight in priors if len(prior)]


def _better(loss: float, than: float) -> bool:
    if not math.isfinite(than):
        return True
    return math.isfinite(loss) and loss < than
