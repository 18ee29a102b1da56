"""DLG and iDLG: rebuild private inputs by matching a shared gradient.

Both start from random dummy inputs, replay the client's step on them and move
the dummies (with L-BFGS) until their gradient matches the shared one.  DLG
also learns a dummy label (a logit vector through softmax); iDLG reads the label
off the last layer's gradient first and optimises the inputs alone.

The default configuration is the papers' protocol.  ``improved=True`` adds
what makes the attack reliable: a strong-Wolfe line search (plain L-BFGS at
learning rate 1 sometimes blows up), a convergence check after every step,
and fresh random restarts when the loss goes non-finite or stalls.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gradleak.attacks.analytic import analytic_inputs, analytic_label_logits
from gradleak.attacks.labels import batch_labels, idlg_label
from gradleak.attacks.matching import matching_loss
from gradleak.attacks.threads import attack_threads
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.types import Observation, Reconstruction, Snapshot

StepCallback = Callable[[int, float], None]

# Steps without 10% progress after which a run from the closed-form start has
# stalled: such a start converges at once or sits at the precision floor of the
# shared gradient, where more line searches only shave digits.
WARM_PATIENCE = 2


@dataclass(frozen=True)
class AttackConfig:
    """How an attack optimises; the defaults are the papers' protocol.

    Attributes:
        iterations: L-BFGS steps (the iDLG code and DLG's public code use 300).
        lr: L-BFGS learning rate.
        history_size: L-BFGS memory.
        max_iter: Inner L-BFGS iterations per step.
        tolerance: Stop once the matching loss is below this (the papers'
            absolute 1e-6).
        relative_tolerance: Improved mode stops instead once the loss is
            below this share of the shared gradient's squared norm: an
            absolute threshold means little for a confident model, whose
            gradient is tiny (a victim with ``||g||^2 = 0.3`` met 1e-6 at
            MSE 1.3e-3).  2e-9 of a typical ``||g||^2`` of 500 is 1e-6.
        check_every: Check the tolerance every this many steps (iDLG: 10).
            Improved mode checks after every step.
        snapshot_every: Keep the dummy input every this many steps.
        improved: Strong-Wolfe line search, per-step checks, float64
            arithmetic, restarts.
        max_restarts: Improved mode: at most this many fresh starts.
        patience: Improved mode: a run has stalled when its loss has not
            fallen by 10% over this many steps.
        restart_above: Improved mode: a stalled run restarts when its loss is
            above this share of the shared gradient's squared norm (a bad
            basin); below it the run is at its precision floor and stops.
        init: Where the dummy inputs start: "normal" (standard normal, the
            papers'), "midgray" (0.5 plus normal noise of std 0.01: the
            attacker knows pixels lie in [0, 1], and starting inside that
            range shortens the path several-fold), or "auto" (midgray when
            improved).
        warm_start: "analytic" starts from the closed-form estimate of the
            input that the gradient of a sigmoid conv net gives layer by layer
            (analytic.py; a single example of a supported model, else the
            usual draw), "none" from the draw, "auto" analytic when improved.
            DLG's dummy label then starts from the negated bias gradient
            (nearly the one-hot label) to agree with it.  Restarts always
            start from a fresh draw.
        precision: "float32", "float64", or "auto" (float64 when improved).
            The attacker is free to compute in higher precision than the
            client did; it makes L-BFGS's curvature pairs reliable at small
            losses.
    """

    iterations: int = 300
    lr: float = 1.0
    history_size: int = 100
    max_iter: int = 20
    tolerance: float = 1e-6
    relative_tolerance: float = 2e-9
    check_every: int = 10
    snapshot_every: int = 10
    improved: bool = False
    max_restarts: int = 4
    patience: int = 40
    restart_above: float = 1e-8
    init: str = "auto"
    warm_start: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.iterations <= 0:
            raise ConfigError(f"iterations must be positive, got {self.iterations}")
        if self.lr <= 0 or self.history_size <= 0 or self.max_iter <= 0:
            raise ConfigError("lr, history_size and max_iter must be positive")
        if self.check_every <= 0 or self.snapshot_every <= 0:
            raise ConfigError("check_every and snapshot_every must be positive")
        if self.init not in ("auto", "normal", "midgray"):
            raise ConfigError(f"init must be auto, normal or midgray, not {self.init!r}")
        if self.warm_start not in ("auto", "analytic", "none"):
            raise ConfigError(f"warm_start must be auto, analytic or none, not {self.warm_start!r}")
        if self.precision not in ("auto", "float32", "float64"):
            raise ConfigError(f"precision must be auto, float32 or float64, not {self.precision!r}")

    def initial_inputs(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Draw the dummy inputs' starting point (on the CPU, in float32)."""
        noise = torch.randn(shape, generator=generator)
        if self.init == "midgray" or (self.init == "auto" and self.improved):
            return 0.5 + 0.01 * noise
        return noise

    @property
    def analytic_start(self) -> bool:
        """Whether the first run starts from the closed-form estimate (where one exists)."""
        return self.warm_start == "analytic" or (self.warm_start == "auto" and self.improved)

    def threshold(self, squared_norm: float) -> float:
        """The matching loss below which a run has converged."""
        if self.improved:
            return self.relative_tolerance * squared_norm
        return self.tolerance

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point type the attack computes in."""
        if self.precision == "float64" or (self.precision == "auto" and self.improved):
            return torch.float64
        return torch.float32


class GradientInversion:
    """Common machinery of DLG and iDLG: configure once, call on observations.

    Args:
        config: An `AttackConfig`; keyword overrides are applied on top of it
            (``IDLG(improved=True)``).
    """

    name = "base"
    learns_labels = True

    def __init__(self, config: AttackConfig | None = None, **overrides: object) -> None:
        self.config = dataclasses.replace(config or AttackConfig(), **overrides)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def __call__(
        self,
        observation: Observation,
        *,
        seed: int = 0,
        callback: StepCallback | None = None,
        start: torch.Tensor | None = None,
        start_labels: torch.Tensor | None = None,
    ) -> Reconstruction:
        """Attack one observation.

        Args:
            observation: What the attacker saw.
            seed: Seed of the dummy initialisation (equal seeds, equal results).
            callback: Called as ``callback(step, loss)`` after every step.
            start: Where the dummy input starts, shape ``(batch_size,
                *input_shape)``, in place of the seeded draw (and of the
                closed-form start): any run can be replayed from a given
                point.  The draws are still made, so ``start`` equal to the
                seeded draw gives the seeded run bit for bit.  Converted to
                the attack's precision; restarts draw afresh.
            start_labels: DLG only: where its dummy label logits start,
                shape ``(batch_size, num_classes)``.

        Raises:
            AttackNotApplicable: The shared gradient is all zeros.
            ConfigError: A start of the wrong shape, or labels for an
                attack that reads its labels.
        """
        require_nonzero_gradient(observation)
        start, start_labels = self.check_start(observation, start, start_labels)
        with attack_threads(observation.device):
            generator = torch.Generator().manual_seed(seed)
            labels = self.infer_labels(observation)
            return _optimise(
                observation, labels, self.config, generator, callback, (start, start_labels)
            )

    def check_start(
        self,
        observation: Observation,
        start: torch.Tensor | None,
        start_labels: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`start` and `start_labels` checked and in the attack's precision, or None."""
        dtype = self.config.dtype
        shape = (observation.batch_size, *observation.input_shape)
        if start is not None:
            if tuple(start.shape) != shape:
                raise ConfigError(f"start must have shape {shape}, got {tuple(start.shape)}")
            start = start.detach().to(observation.device, dtype)
        if start_labels is not None:
            if not self.learns_labels:
                raise ConfigError(f"{self.name} reads its labels: it takes no start_labels")
            shape = (observation.batch_size, observation.num_classes)
            if tuple(start_labels.shape) != shape:
                raise ConfigError(
                    f"start_labels must have shape {shape}, got {tuple(start_labels.shape)}"
                )
            start_labels = start_labels.detach().to(observation.device, dtype)
        return start, start_labels

    def infer_labels(self, observation: Observation) -> torch.Tensor | None:
        """Labels known before optimising, or None when the attack learns them."""
        return None


class DLG(GradientInversion):
    """Deep Leakage from Gradients (Zhu, Liu, Han; NeurIPS 2019).

    https://arxiv.org/abs/1906.08935. Optimises dummy inputs and dummy labels
    (logits through softmax) so that their gradient matches the shared one.
    Defaults: L-BFGS lr 1, history 100, 20 inner iterations, 300 steps.

    Shapes: reconstructs ``(batch_size, *input_shape)`` inputs and
    ``(batch_size,)`` labels (the argmax of the learned soft labels).
    """

    name = "dlg"


class IDLG(GradientInversion):
    """Improved Deep Leakage from Gradients (Zhao, Mopuri, Bilen; 2020).

    https://arxiv.org/abs/2001.02610. Reads the label exactly from the sign of
    the last Linear layer's weight gradient, then optimises the dummy input
    alone with cross-entropy on that label.  Same L-BFGS defaults as DLG.
    Applies to models ending in a Linear layer.  On a batch it reads the
    label multiset with `batch_labels` (the last layer's bias gradient and
    the model) and optimises the inputs alone: gradleak's improved DLG for
    batches, where the faithful DLG learns the labels.  Shapes: as DLG; the
    labels come out in ascending order, not the batch's.
    """

    name = "idlg"
    learns_labels = False

    def infer_labels(self, observation: Observation) -> torch.Tensor:
        if observation.batch_size > 1:
            return batch_labels(observation)
        return torch.tensor([idlg_label(observation)], device=observation.device)


ATTACKS: dict[str, type[GradientInversion]] = {"dlg": DLG, "idlg": IDLG}

ZERO_GRADIENT_HINT = (
    "a client loss of exactly zero, e.g. from a model with a single class, has no gradient; "
    "use 2 or more classes"
)


def require_nonzero_gradient(
    observation: Observation, *, victim: int | None = None, hint: str = ZERO_GRADIENT_HINT
) -> None:
    """Raise `AttackNotApplicable` when the shared gradient is all zeros.

    A zero gradient says nothing about the input (with a single class, every
    input gives it), so an attack would match it at once and report success
    while recovering nothing.
    """
    if any(bool(g.any()) for g in observation.gradients):
        return
    whose = "shared gradient" if victim is None else f"shared gradient of victim {victim}"
    raise AttackNotApplicable(f"the {whose} is all zeros: there is nothing to attack ({hint})")


def build_attack(
    name: str, config: AttackConfig | None = None, **overrides: object
) -> GradientInversion:
    """Build an attack by name ("dlg" or "idlg")."""
    if name not in ATTACKS:
        raise ConfigError(f"unknown method '{name}': choose one of {', '.join(ATTACKS)}")
    return ATTACKS[name](config, **overrides)


Start = tuple[torch.Tensor | None, torch.Tensor | None]


def _optimise(
    observation: Observation,
    labels: torch.Tensor | None,
    config: AttackConfig,
    generator: torch.Generator,
    callback: StepCallback | None,
    start: Start = (None, None),
) -> Reconstruction:
    """The sequential reference engine: one victim, torch.optim.LBFGS.

    Faithful mode is the published loop (`_published_steps`); improved mode
    adds its checks and restarts (`_run_steps`).  `start` is the caller's
    ``(inputs, label_logits)`` start, each None for the usual one.
    """
    dtype = config.dtype
    model = observation.model
    train = observation.batchnorm == "train"
    if dtype != next(model.parameters()).dtype or model.training != train:
        # The client's mode, on a copy: the server's model stays as it was.
        model = copy.deepcopy(model).to(dtype).train(train)
    parameters = [p for p in model.parameters() if p.requires_grad]
    shared = [g.detach().to(dtype) for g in observation.gradients]
    squared_norm = float(sum((g**2).sum() for g in shared))
    floor = config.restart_above * squared_norm
    tolerance = config.threshold(squared_norm)
    shape = (observation.batch_size, *observation.input_shape)
    device = observation.device
    state = _Run()
    best: tuple[float, torch.Tensor, torch.Tensor, tuple[Snapshot, ...]] | None = None

    while True:
        # Draw on the CPU so that a seed means the same start on every device.
        x = config.initial_inputs(shape, generator).to(device, dtype)
        label_logits = None
        if labels is None:
            label_logits = torch.randn(
                (observation.batch_size, observation.num_classes), generator=generator
            ).to(device, dtype)
        given_x, given_logits = start if state.restarts == 0 else (None, None)
        if given_x is not None:
            x = given_x.clone()
        if given_logits is not None:
            label_logits = given_logits.clone()
        if state.restarts == 0 and config.analytic_start and given_x is None:
            warm = analytic_inputs([observation], labels, dtype=dtype)
            if warm is not None and bool(torch.isfinite(warm).all()):
                x, state.warm = warm.to(device, dtype), True
                if label_logits is not None and given_logits is None:
                    label_logits = analytic_label_logits(observation).to(device, dtype)
        variables = [x.requires_grad_(True)]
        if label_logits is not None:
            variables.append(label_logits.requires_grad_(True))
        optimiser = torch.optim.LBFGS(
            variables,
            lr=config.lr,
            history_size=config.history_size,
            max_iter=config.max_iter,
            line_search_fn="strong_wolfe" if config.improved else None,
        )

        closure = _closure(
            model, parameters, shared, variables, labels, state, as_published=not config.improved
        )
        if config.improved:
            outcome, loss, point = _run_steps(
                optimiser, closure, variables, config, state, callback, floor, tolerance
            )
        else:
            outcome, loss, point = _published_steps(
                optimiser, closure, variables, config, state, callback, tolerance
            )
        x_final, logits_final = point[0], point[1] if labels is None else None
        run_labels = labels if labels is not None else logits_final.argmax(dim=-1)
        if best is None or _better(loss, best[0]):
            best = (loss, x_final, run_labels, state.snapshots)
        # A stall after a closed-form start is final (see engine.py).
        stalled_warm = outcome == "stalled" and state.restarts == 0 and state.warm
        retry = (
            config.improved
            and outcome in ("diverged", "stalled")
            and not stalled_warm
            and state.restarts < config.max_restarts
            and state.steps < config.iterations
        )
        if not retry:
            break
        state.restarts += 1
        state.warm = False
        state.snapshots = ()

    loss, x_best, labels_best, snapshots = best
    return Reconstruction(
        inputs=x_best.detach().to(observation.gradients[0].dtype),
        labels=labels_best.detach().reshape(-1),
        loss_history=tuple(state.history),
        snapshots=snapshots,
        steps=state.steps,
        evaluations=state.evaluations,
        restarts=state.restarts,
        converged=loss < tolerance,
    )


@dataclasses.dataclass
class _Run:
    """Counters that survive restarts."""

    steps: int = 0
    evaluations: int = 0
    restarts: int = 0
    warm: bool = False  # the first run started from the closed form
    history: list[float] = dataclasses.field(default_factory=list)
    snapshots: tuple[Snapshot, ...] = ()


def _published_steps(
    optimiser: torch.optim.LBFGS,
    closure: Callable[[], torch.Tensor],
    variables: list[torch.Tensor],
    config: AttackConfig,
    state: _Run,
    callback: StepCallback | None,
    tolerance: float,
) -> tuple[str, float, list[torch.Tensor]]:
    """iDLG's published loop, op for op: a step, then the loss where it landed.

    ``for k in range(iterations)``: one L-BFGS step, the matching loss at
    the point it reached (the one the history records), and at ``k = 0, 10,
    20, ...`` a stop once that loss is below the tolerance, so the run ends at
    the point x1, x11, x21, ... it was checked at.  The loss after step k is
    also what step k + 1 starts by evaluating; the closure returns its last
    result when asked again at the same point, so the published extra
    evaluation costs nothing and changes nothing.  A non-finite loss does not
    stop the run (the published loop has no such check).  Once every entry of
    the point is NaN, every later point, loss and gradient is NaN too (NaN
    plus anything is NaN), so the run ends there with the history the
    remaining steps would give: NaN up to the step budget.

    Returns ("converged", "diverged" or "budget"), the loss at the returned
    point, and the point.
    """
    snapshots = [Snapshot(0, variables[0].detach().cpu().clone())]
    loss = math.nan
    outcome = "budget"
    for k in range(config.iterations):
        optimiser.step(closure)
        loss = float(closure())
        state.steps += 1
        state.history.append(loss)
        if callback is not None:
            callback(k, loss)
        if state.steps % config.snapshot_every == 0:
            snapshots.append(Snapshot(state.steps, variables[0].detach().cpu().clone()))
        if k % config.check_every == 0 and loss < tolerance:
            outcome = "converged"
            break
        if all(bool(torch.isnan(v).all()) for v in variables):
            for later in range(k + 1, config.iterations):
                state.history.append(math.nan)
                if callback is not None:
                    callback(later, math.nan)
            state.steps += config.iterations - (k + 1)
            break
    state.snapshots = tuple(snapshots)
    if not math.isfinite(loss):
        outcome = "diverged"
    return outcome, loss, [v.detach().clone() for v in variables]


def _run_steps(
    optimiser: torch.optim.LBFGS,
    closure: Callable[[], torch.Tensor],
    variables: list[torch.Tensor],
    config: AttackConfig,
    state: _Run,
    callback: StepCallback | None,
    floor: float,
    tolerance: float,
) -> tuple[str, float, list[torch.Tensor]]:
    """Improved mode: step until converged, diverged, stalled or out of budget.

    Returns the outcome ("converged", "diverged", "stalled" in a bad basin,
    "floor" when stalled at a tiny loss, or "budget"), the matching loss at
    the returned point and the point.
    ``optimiser.step`` returns the loss at the point it started from, so the
    point is copied before each step: when that loss is below the tolerance,
    that is the point we return.  The history starts with the loss at the
    start: a closed-form start may be the answer already.
    """
    snapshots = [Snapshot(0, variables[0].detach().cpu().clone())]
    best_recent = math.inf
    since_progress = 0
    local_step = 0
    while state.steps < config.iterations:
        before = [v.detach().clone() for v in variables]
        loss = float(optimiser.step(closure))
        if not math.isfinite(loss):
            state.snapshots = tuple(snapshots)
            return "diverged", loss, before
        state.history.append(loss)  # the loss at the point `local_step` steps in
        if callback is not None:
            callback(state.steps, loss)
        if loss < tolerance:
            state.snapshots = tuple(snapshots)
            return "converged", loss, before
        state.steps += 1
        local_step += 1
        if local_step % config.snapshot_every == 0:
            snapshots.append(Snapshot(local_step, variables[0].detach().cpu().clone()))
        if loss < 0.9 * best_recent:
            best_recent, since_progress = loss, 0
        else:
            since_progress += 1
            if since_progress >= (WARM_PATIENCE if state.warm else config.patience):
                state.snapshots = tuple(snapshots)
                return ("stalled" if loss > floor else "floor"), loss, before
    # Out of budget: the last step moved the point without evaluating it there.
    final = float(closure())
    state.history.append(final)
    if callback is not None:
        callback(state.steps, final)
    state.snapshots = tuple(snapshots)
    outcome = "converged" if final < tolerance else "budget"
    if not math.isfinite(final):
        outcome = "diverged"
    return outcome, final, [v.detach().clone() for v in variables]


def _closure(
    model: torch.nn.Module,
    parameters: list[torch.Tensor],
    shared: list[torch.Tensor],
    variables: list[torch.Tensor],
    labels: torch.Tensor | None,
    state: _Run,
    *,
    as_published: bool,
) -> Callable[[], torch.Tensor]:
    """The L-BFGS closure: matching loss, with its gradient left in ``.grad``.

    ``variables`` is ``[inputs]`` with known labels, ``[inputs, label_logits]``
    without.  Gradients go to the dummies only, never into the model.  Asked
    again at the point it last evaluated (equal values), it returns that
    result instead of computing the same numbers twice; only evaluations
    count in ``state.evaluations``.
    """
    x = variables[0]
    label_logits = variables[1] if labels is None else None
    last: list = []  # [point, loss, gradients] of the last evaluation

    def closure() -> torch.Tensor:
        point = [v.detach() for v in variables]
        if last and all(torch.equal(a, b) for a, b in zip(last[0], point, strict=True)):
            loss, gradients = last[1], last[2]
        else:
            state.evaluations += 1
            with torch.enable_grad():
                value = matching_loss(
                    model, parameters, shared, x,
                    labels=labels, label_logits=label_logits, as_published=as_published,
                )  # fmt: skip
                gradients = torch.autograd.grad(value, variables)
            loss = value.detach()
            last[:] = [[p.clone() for p in point], loss, gradients]
        for v, g in zip(variables, gradients, strict=True):
            v.grad = g
        return loss

    return closure


def _better(loss: float, than: float) -> bool:
    if not math.isfinite(than):
        return True
    return math.isfinite(loss) and loss < than
