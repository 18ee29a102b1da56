"""Which attack the audit runs on a client's reply, and why: one small function.

The contract (the same as the project's attack chooser, `--method auto`, once
it lands on main): an observation in, ``(attack, method name, reason)`` out.
Until then the rule lives here:

* A FedAvg update (several local steps): Inverting Gradients, which unrolls
  the client's local SGD from the weights sent with the schedule sent.
* A gradient (one local step on the whole batch: ``-update / lr``):
  - clipped by the client to the clipping norm the server sent (Flower's
    client-side DP clipping): its scale is lost, and iDLG's matching needs it.
    For one image of a sigmoid conv net the closed-form start does not (every
    equation it solves is linear in the gradient's scale), so `ScaleFreeIDLG`
    reads the image in closed form, measures the scale against that image's
    own gradient, undoes it and runs the improved iDLG; otherwise Inverting
    Gradients, which matches the direction only;
  - a sigmoid conv net ending in a Linear layer (iDLG's LeNet): the improved
    iDLG, whose closed-form start reads a single image back exactly and whose
    batch label rule and float64 matching handle small batches;
  - any other model (ReLU, BatchNorm): Inverting Gradients.

IG's total-variation weight defaults to 1e-3 here, not the paper's 0.2: on
iDLG's LeNet and MNIST digits (4 local steps at lr 0.01, one image, 500
steps) 0.2 left three digits at MSE 0.05-0.08 and 1e-3 brought them to
0.8-1.4e-4 (`/tmp` measurement of 2026-12-02, quoted in the README).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gradleak.attacks import DLG, IDLG, StepCallback
from gradleak.attacks.analytic import analytic_inputs, sigmoid_conv_chain
from gradleak.attacks.inverting import IGConfig, InvertingGradients
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.types import Observation, Reconstruction, UpdateObservation

METHODS = ("auto", "idlg", "dlg", "ig")
IG_ITERATIONS = 500
IG_TV_SCALE = 1e-3


@dataclass(frozen=True)
class Choice:
    """The attack to run, its name in reports, and one sentence on why."""

    attack: Any
    method: str
    reason: str


def choose_attack(
    observation: Observation | UpdateObservation,
    *,
    method: str = "auto",
    clipped: bool = False,
    iterations: int | None = None,
    tv_scale: float = IG_TV_SCALE,
) -> Choice:
    """The strongest attack that applies to `observation` (or the one `method` names).

    Args:
        observation: What the server holds of one client (or of an aggregate).
        method: "auto", or "idlg", "dlg", "ig" to override the choice.
        clipped: The update was clipped to a norm the server sent: its scale is lost.
        iterations: Optimiser steps (None: the method's own; IG: `IG_ITERATIONS`).
        tv_scale: IG's total-variation weight.

    Raises:
        ConfigError: An unknown method.
        AttackNotApplicable: iDLG or DLG asked for on an update of several steps.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    update = isinstance(observation, UpdateObservation)
    steps = observation.steps if update else 1
    if method in ("idlg", "dlg"):
        if update:
            raise AttackNotApplicable(
                f"{method} attacks a gradient and this client ran {steps} local steps; "
                "use --method auto or ig"
            )
        kind = IDLG if method == "idlg" else DLG
        options = {} if iterations is None else {"iterations": iterations}
        return Choice(kind(improved=True, **options), method, f"{method} asked for (--method)")
    ig = InvertingGradients(
        IGConfig(
            iterations=iterations or IG_ITERATIONS,
            tv_scale=tv_scale,
            snapshot_every=iterations or IG_ITERATIONS,
        )
    )
    if method == "ig":
        return Choice(ig, "ig", "ig asked for (--method)")
    if update:
        return Choice(
            ig,
            "ig",
            f"{steps} local steps: the update is not one gradient; Inverting Gradients replays "
            f"the client's {steps} SGD steps at lr {observation.local_lr:g} from the weights sent",
        )
    closed_form = sigmoid_conv_chain(observation) is not None
    if clipped and closed_form and observation.batch_size == 1:
        return Choice(
            ScaleFreeIDLG(_idlg(iterations)),
            "idlg-rescaled",
            "the client clipped its update to the clipping norm the server sent, so the "
            "gradient's scale is lost; the closed form does not need it, and the scale it "
            "measures against the image it reads is undone before iDLG's matching",
        )
    if clipped:
        return Choice(
            ig,
            "ig",
            "the client clipped its update to the clipping norm the server sent, so the "
            "gradient's scale is lost; Inverting Gradients matches its direction only",
        )
    if closed_form:
        return Choice(
            _idlg(iterations),
            "idlg",
            "one local step: -update/lr is the client's gradient; the sigmoid conv net admits "
            "iDLG's label rule and a closed-form start, then float64 gradient matching",
        )
    return Choice(
        ig,
        "ig",
        "one local step: -update/lr is the client's gradient; no closed form for this model "
        "(ReLU or BatchNorm), so Inverting Gradients",
    )


def _idlg(iterations: int | None) -> IDLG:
    return IDLG(improved=True, **({} if iterations is None else {"iterations": iterations}))


class ScaleFreeIDLG:
    """The improved iDLG on a gradient known only up to a positive factor (a clipped one).

    The closed-form start reads the image from ratios and linear systems that
    are all homogeneous in the gradient, so it reads the same image from
    ``s * g`` as from ``g``.  The factor then follows by least squares
    against that image's own gradient, ``s = <g', g_hat> / <g_hat, g_hat>``,
    and the attack runs on ``g' / s``.  When the closed form does not apply
    (or gives no finite image) the gradient is attacked as it came.
    """

    name = "idlg-rescaled"

    def __init__(self, inner: IDLG) -> None:
        self.inner = inner

    def __call__(
        self, observation: Observation, *, seed: int = 0, callback: StepCallback | None = None
    ) -> Reconstruction:
        scale = self.scale(observation)
        if scale is not None:
            gradients = tuple(g / scale for g in observation.gradients)
            observation = dataclasses.replace(observation, gradients=gradients)
        return self.inner(observation, seed=seed, callback=callback)

    def scale(self, observation: Observation) -> float | None:
        """The factor between the shared gradient and the gradient of the closed-form image."""
        labels = self.inner.infer_labels(observation)
        start = analytic_inputs([observation], labels, dtype=torch.float64)
        if start is None or not bool(torch.isfinite(start).all()):
            return None
        model = copy.deepcopy(observation.model).double()
        parameters = [p for p in model.parameters() if p.requires_grad]
        loss = F.cross_entropy(model(start), labels.to(start.device))
        own = torch.autograd.grad(loss, parameters)
        shared = [g.double() for g in observation.gradients]
        dot = sum(float((a * b).sum()) for a, b in zip(shared, own, strict=True))
        norm = sum(float((b * b).sum()) for b in own)
        scale = dot / norm if norm > 0 else float("nan")
        return scale if scale > 0 and scale == scale and scale != float("inf") else None
