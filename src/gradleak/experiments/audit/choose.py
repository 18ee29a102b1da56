"""Which attack the audit runs on a client's reply, and why.

The choice is the project's attack chooser (`gradleak.attacks.auto`, the
`--method auto` of `gradleak attack`): improved iDLG on gradients of smooth
models, Inverting Gradients on updates of several local steps and on models
with ReLU or max-pooling.  The audit adds what only the server's seat knows:

* `clipped`: the client clipped its update to the clipping norm the server
  sent (Flower's client-side DP clipping), so the gradient's scale is lost,
  and iDLG's matching needs it.  For one image of a sigmoid conv net the
  closed-form start does not (every equation it solves is homogeneous in the
  gradient), so `ScaleFreeIDLG` reads the image in closed form, measures the
  scale against that image's own gradient, undoes it and runs the improved
  iDLG ("idlg-rescaled"); otherwise Inverting Gradients, which matches the
  direction only.
* `--method idlg|dlg|ig` overrides the choice (iDLG and DLG attack gradients
  only).

Inverting Gradients runs 500 steps with a total-variation weight of 1e-3 here,
not the paper's 24,000 and 0.2: on iDLG's LeNet and MNIST digits (4 local steps
at lr 0.01, one image each) 0.2 left the digits blurred at MSE 0.05-0.08 and
1e-3 brought them below 1e-3, with no gain from 1,000 steps over 500
(`tools/audit_ig_settings.py`, README "Auditing a Flower run").
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F

from gradleak.attacks import DLG, IDLG, StepCallback
from gradleak.attacks.analytic import analytic_inputs, sigmoid_conv_chain
from gradleak.attacks.auto import Choice
from gradleak.attacks.auto import choose_attack as auto_choice
from gradleak.attacks.inverting import IGConfig, InvertingGradients
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.types import Observation, Reconstruction, UpdateObservation

METHODS = ("auto", "idlg", "dlg", "ig")
IG_ITERATIONS = 500
IG_TV_SCALE = 1e-3


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

    Returns:
        The attack, the observation to run it on, its name and one sentence on why.

    Raises:
        ConfigError: An unknown method.
        AttackNotApplicable: iDLG or DLG asked for on an update of several steps.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    ig_config = IGConfig(
        iterations=iterations or IG_ITERATIONS,
        tv_scale=tv_scale,
        snapshot_every=iterations or IG_ITERATIONS,
    )
    update = isinstance(observation, UpdateObservation)
    if method == "ig":
        return Choice(InvertingGradients(ig_config), "ig", observation, "ig asked for (--method)")
    if method in ("idlg", "dlg"):
        if update:
            raise AttackNotApplicable(
                f"{method} attacks a gradient and this client ran {observation.steps} local "
                "steps; use --method auto or ig"
            )
        kind = IDLG if method == "idlg" else DLG
        options = {} if iterations is None else {"iterations": iterations}
        return Choice(kind(improved=True, **options), method, observation, f"{method} asked for")
    choice = auto_choice(observation, iterations=iterations, ig=ig_config)
    if not clipped or choice.method != "idlg":
        return choice
    seen = choice.observation
    why = "the client clipped its update to the clipping norm the server sent, so the "
    closed_form = isinstance(seen, Observation) and seen.batch_size == 1
    if closed_form and sigmoid_conv_chain(seen) is not None:
        return Choice(
            ScaleFreeIDLG(choice.attack),
            "idlg-rescaled",
            seen,
            why + "gradient's scale is lost; the closed form does not need it, and the scale "
            "it measures against the image it reads is undone before iDLG's matching",
        )
    return Choice(
        InvertingGradients(ig_config),
        "ig",
        seen,
        why + "gradient's scale is lost; Inverting Gradients matches its direction only",
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
