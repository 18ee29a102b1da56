"""The batched engine: attack many independent victims as one computation.

`attack_batch` runs an attack's algorithm on V victims at once: one vmapped
evaluation gives every victim's matching loss and gradient (objective.py),
and a batched L-BFGS keeps each victim's own memory, step and stopping state
(lbfgs.py).  Victims that finish leave the work, so the batch shrinks.

Faithful mode follows the sequential engine (`GradientInversion.__call__`,
torch.optim.LBFGS) step for step; tests compare the two.  Improved mode uses
`RobustLBFGS` (L-BFGS with a backtracking line search) rather than torch's
strong-Wolfe search, which does not vectorise: same goal (no step may raise
the loss), float64, checks after every iteration, restarts from a fresh
random start when a run diverges or stalls in a bad basin.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from gradleak.attacks.analytic import ClosedFormCache, analytic_label_logits
from gradleak.attacks.dlg import (
    WARM_PATIENCE,
    AttackConfig,
    GradientInversion,
    require_nonzero_gradient,
)
from gradleak.attacks.explicit import plain_blocks
from gradleak.attacks.layered import plain_layers
from gradleak.attacks.lbfgs import FaithfulLBFGS, RobustLBFGS, SplitLBFGS
from gradleak.attacks.objective import BatchedObjective
from gradleak.attacks.threads import attack_threads
from gradleak.types import Observation, Reconstruction, Snapshot


@dataclass
class _Victim:
    """Everything about one victim that is not a row of a batched tensor."""

    generator: torch.Generator
    keep_frames: bool
    history: list[float] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    evaluations: int = 0
    restarts: int = 0
    best: tuple[float, torch.Tensor] | None = None
    result: Reconstruction | None = None
    warm: bool = False  # started from the closed form (a stall there is final)
    label: torch.Tensor | None = None  # the known label; None where the row learns it
    learns: bool = True  # the row's variable holds label logits it learns


def attack_batch(
    attack: GradientInversion,
    observations: Sequence[Observation],
    seeds: Sequence[int],
    *,
    snapshots: Sequence[bool] | None = None,
    on_result: Callable[[int, Reconstruction], None] | None = None,
    width: int = 32,
    starts: Sequence[torch.Tensor | None] | None = None,
    start_labels: Sequence[torch.Tensor | None] | None = None,
    path: str | None = None,
    closed_form: ClosedFormCache | None = None,
) -> list[Reconstruction]:
    """Attack many observations at once (each one example, or all the same batch size).

    Args:
        attack: A configured DLG or IDLG; its config decides the algorithm.
        observations: One per victim, same architecture (weights differ).
        seeds: The dummy-init seed of each victim (as `attack(obs, seed=...)`).
        snapshots: Per victim, whether to keep its snapshot frames.
        on_result: Called with a victim's index and reconstruction as soon as
            it finishes (a caller can save it at once, before the rest end).
        width: Faithful mode attacks at most this many victims at a time and
            starts the next ones as others finish, so that the batch stays
            full instead of ending with its slowest victim alone.
        starts: Per victim, its given start (or None), as ``start`` of
            `GradientInversion.__call__`.
        start_labels: Per victim, DLG's given label-logit start (or None).
        path: The objective's path ("explicit", "stacked", "vmapped"; None:
            the fastest that applies).  Tests and benchmarks compare them.
        closed_form: A cache of closed-form starts shared with other attacks
            on the same observations (computed once where they agree).

    Returns:
        One reconstruction per victim, in input order.

    Raises:
        AttackNotApplicable: A victim's shared gradient is all zeros.
    """
    if len(observations) != len(seeds):
        raise ValueError("one seed per observation")
    if not observations:
        return []
    for i, observation in enumerate(observations):
        require_nonzero_gradient(observation, victim=i if len(observations) > 1 else None)
    given = []
    for i, observation in enumerate(observations):
        x0 = starts[i] if starts is not None else None
        l0 = start_labels[i] if start_labels is not None else None
        given.append(attack.check_start(observation, x0, l0))
    with attack_threads(observations[0].device):
        return _attack_rows(
            [attack] * len(observations), observations, seeds, snapshots, on_result, width,
            given, path, closed_form or ClosedFormCache(),
        )  # fmt: skip


def attack_together(
    attacks: Sequence[GradientInversion],
    observations: Sequence[Observation],
    seeds: Sequence[Sequence[int]],
    *,
    snapshots: Sequence[bool] | None = None,
    on_result: Callable[[int, int, Reconstruction], None] | None = None,
    closed_form: ClosedFormCache | None = None,
) -> list[list[Reconstruction]]:
    """Several attacks (DLG and iDLG, one mode) on the same victims, as one batch.

    Each attack's rows run its own algorithm: its labels, its seeds, its own
    L-BFGS state, as `attack_batch` would.  Sharing the batch lets the rows
    of one victim share every pass over its large last layer (lowrank.py):
    LFW's 5,749 x 768 weights stream from memory four times per evaluation,
    and two columns cost about what one does.  The iDLG rows are padded to
    DLG's variable size with entries that get no gradient, so they take the
    same steps up to round-off.  Where the objective cannot mix attacks (a
    net explicit.py does not write out), the attacks run one after another.

    Args:
        attacks: The attacks; their configs must agree but for the method.
        observations: One per victim.
        seeds: ``seeds[a][i]``: attack a's seed for victim i.
        snapshots: Per victim, whether to keep its snapshot frames.
        on_result: ``on_result(attack index, victim index, reconstruction)``
            as soon as a row finishes.
        closed_form: A cache of closed-form starts (shared where they agree).

    Returns:
        ``results[a][i]``.
    """
    if len(seeds) != len(attacks) or any(len(s) != len(observations) for s in seeds):
        raise ValueError("one seed per attack and observation")
    base = dataclasses.replace(attacks[0].config)
    if any(a.config != base for a in attacks):
        raise ValueError("attacks together must share one configuration")
    closed_form = closed_form or ClosedFormCache()
    if not observations:
        return [[] for _ in attacks]
    learns = {a.learns_labels for a in attacks}
    if len(attacks) == 1 or len(learns) == 1 or not _mixable(observations[0]):
        return [
            attack_batch(
                a,
                observations,
                seeds[k],
                snapshots=snapshots,
                closed_form=closed_form,
                width=len(observations),
                on_result=None if on_result is None else (lambda i, r, k=k: on_result(k, i, r)),  # type: ignore[misc]
            )  # fmt: skip
            for k, a in enumerate(attacks)
        ]
    for i, observation in enumerate(observations):
        require_nonzero_gradient(observation, victim=i if len(observations) > 1 else None)
    # Rows interleaved by victim: both attacks on victim i are neighbours.
    order = [(k, i) for i in range(len(observations)) for k in range(len(attacks))]
    frames = [bool(snapshots and snapshots[i]) for _, i in order]

    def row_done(row: int, result: Reconstruction) -> None:
        if on_result is not None:
            on_result(*order[row], result)

    with attack_threads(observations[0].device):
        results = _attack_rows(
            [attacks[k] for k, _ in order], [observations[i] for _, i in order],
            [seeds[k][i] for k, i in order], frames, row_done, len(order),
            [(None, None)] * len(order), None, closed_form,
        )  # fmt: skip
    out: list[list[Reconstruction]] = [[None] * len(observations) for _ in attacks]  # type: ignore[list-item]
    for (k, i), result in zip(order, results, strict=True):
        out[k][i] = result
    return out


def _mixable(observation: Observation) -> bool:
    """Whether rows of several attacks on this architecture can share one objective."""
    layers = plain_layers(observation.model, tuple(observation.input_shape))
    return layers is not None and plain_blocks(layers) is not None


def _attack_rows(
    attacks: Sequence[GradientInversion],
    observations: Sequence[Observation],
    seeds: Sequence[int],
    snapshots: Sequence[bool] | None,
    on_result: Callable[[int, Reconstruction], None] | None,
    width: int,
    given: list[tuple[torch.Tensor | None, torch.Tensor | None]],
    path: str | None,
    closed_form: ClosedFormCache,
) -> list[Reconstruction]:
    """The engine on rows: row r is `attacks[r]` on `observations[r]` with `seeds[r]`."""
    config = attacks[0].config
    learns = torch.tensor([a.learns_labels for a in attacks])
    labels = learned = None
    if not bool(learns.all()):
        labels = torch.stack([
            torch.zeros(o.batch_size, dtype=torch.long, device=o.device) if a.learns_labels
            else a.infer_labels(o).reshape(-1)
            for a, o in zip(attacks, observations, strict=True)
        ])  # fmt: skip
        learned = learns.to(labels.device) if bool(learns.any()) else None
    objective = BatchedObjective(
        observations, labels, config.dtype, as_published=not config.improved, learned=learned
    )
    if path is not None:
        objective.use(path)
    victims = [
        _Victim(
            torch.Generator().manual_seed(int(s)),
            bool(snapshots and snapshots[i]),
            label=None if a.learns_labels else labels[i],  # type: ignore[index]
            learns=a.learns_labels,
        )  # fmt: skip
        for i, (s, a) in enumerate(zip(seeds, attacks, strict=True))
    ]
    z0 = torch.stack([_draw(objective, config, v.generator, v.learns) for v in victims])
    z0 = z0.to(objective.device, config.dtype)
    if config.analytic_start:
        _closed_form_start(objective, victims, observations, z0, closed_form, config)
    # Given starts replace the draws (made all the same, as the sequential engine does).
    for i, (x0, l0) in enumerate(given):
        if x0 is not None:
            victims[i].warm = False
            z0[i, : objective.input_size] = x0.flatten()
            if victims[i].learns and l0 is None:
                z0[i, objective.input_size :] = _draw_again(objective, config, seeds[i])
        if l0 is not None:
            z0[i, objective.input_size :] = l0.flatten()
    if config.improved:
        _improved(config, objective, victims, z0, on_result)
    else:
        _faithful(config, objective, victims, z0, on_result, max(1, width))
    return [v.result for v in victims]  # type: ignore[misc]


def _closed_form_start(
    objective: BatchedObjective,
    victims: list[_Victim],
    observations: Sequence[Observation],
    z0: torch.Tensor,
    closed_form: ClosedFormCache,
    config: AttackConfig,
) -> None:
    """Rows that have one start from the closed form (DLG's labels consistent with it)."""
    for learns in (True, False):
        rows = [i for i, v in enumerate(victims) if v.learns == learns]
        if not rows:
            continue
        labels = None if learns else torch.stack([victims[i].label for i in rows])  # type: ignore[misc]
        warm = closed_form.inputs([observations[i] for i in rows], labels, dtype=config.dtype)
        if warm is None:
            continue
        usable = torch.isfinite(warm.flatten(1)).all(1)
        for i, used in zip(rows, usable.tolist(), strict=True):
            victims[i].warm = used
            if not used:
                continue
            z0[i, : objective.input_size] = warm[rows.index(i)].flatten()
            if learns:
                logits = analytic_label_logits(observations[i]).flatten()  # type: ignore[union-attr]
                z0[i, objective.input_size :] = logits.to(z0)


def _draw(
    objective: BatchedObjective,
    config: AttackConfig,
    generator: torch.Generator,
    learns: bool = True,
) -> torch.Tensor:
    # The same draws, in the same order, as the sequential engine: inputs, then
    # logits; a row that does not learn its labels pads their room with zeros.
    batch = objective.batch_size
    parts = [config.initial_inputs((batch, *objective.input_shape), generator).flatten()]
    if objective.learns_labels:
        size = (batch, objective.num_classes)
        parts.append(
            torch.randn(size, generator=generator).flatten()
            if learns
            else torch.zeros(size).flatten()
        )
    return torch.cat(parts)


def _draw_again(objective: BatchedObjective, config: AttackConfig, seed: int) -> torch.Tensor:
    """The label logits `_draw` gives for `seed` (where a closed-form start replaced them)."""
    return _draw(objective, config, torch.Generator().manual_seed(int(seed)))[
        objective.input_size :
    ]


def _finish(
    victim: _Victim,
    objective: BatchedObjective,
    z: torch.Tensor,
    loss: float,
    label: torch.Tensor | None,
    *,
    steps: int,
    tolerance: float,
    dtype: torch.dtype,
) -> None:
    if victim.best is not None and _better(victim.best[0], loss):
        loss, z = victim.best
    x = z[: objective.input_size].reshape(objective.batch_size, *objective.input_shape)
    logits = z[objective.input_size :].reshape(objective.batch_size, -1)
    predicted = label if label is not None else logits.argmax(-1)
    victim.result = Reconstruction(
        inputs=x.detach().to(dtype),
        labels=predicted.detach().reshape(-1),
        loss_history=tuple(victim.history),
        snapshots=tuple(victim.snapshots),
        steps=steps,
        evaluations=victim.evaluations,
        restarts=victim.restarts,
        converged=math.isfinite(loss) and loss < tolerance,
    )


def cold_rows(victims: list[_Victim], rows: torch.Tensor) -> torch.Tensor:
    """Which rows did not start from the closed form."""
    return torch.tensor([not victims[r].warm for r in rows.tolist()], device=rows.device)


def _better(candidate: float, than: float) -> bool:
    return math.isfinite(candidate) and (not math.isfinite(than) or candidate < than)


def _snapshot(victim: _Victim, objective: BatchedObjective, step: int, z: torch.Tensor) -> None:
    if victim.keep_frames:
        x = z[: objective.input_size].reshape(objective.batch_size, *objective.input_shape)
        victim.snapshots.append(Snapshot(step, x.detach().cpu().float().clone()))


def _faithful(
    config: AttackConfig,
    objective: BatchedObjective,
    victims: list[_Victim],
    z0: torch.Tensor,
    on_result: Callable[[int, Reconstruction], None] | None,
    width: int,
) -> None:
    out_dtype = objective.output_dtype  # the client's, as the sequential engine returns
    rows = torch.arange(min(width, len(victims)), device=z0.device)  # victim index of each row
    waiting = torch.arange(len(rows), len(victims), device=z0.device)
    options = {"lr": config.lr, "history": config.history_size, "max_iter": config.max_iter}
    learns = torch.tensor([v.learns for v in victims], device=z0.device)
    optimiser: FaithfulLBFGS | SplitLBFGS
    if objective.learns_labels and not bool(learns.all()):
        # Rows of DLG and iDLG: each kind on its own variable's size.
        assert not len(waiting), "rows of two sizes start together"
        optimiser = SplitLBFGS(z0[rows], ~learns, objective.input_size, **options)  # type: ignore[arg-type]
    else:
        optimiser = FaithfulLBFGS(z0[rows], **options)  # type: ignore[arg-type]
    objective.select(rows)
    steps = torch.zeros(len(rows), dtype=torch.long, device=z0.device)
    while rows.numel():
        loss, g = objective(optimiser.z)
        for r in rows.tolist():
            victims[r].evaluations += 1
        # The published loop (see dlg._published_steps): after step k the loss
        # at the point reached, checked at k = 0, 10, 20, ...; here that loss is
        # the evaluation that starts the next step, at `steps` = k + 1.
        start = optimiser.at_step_start
        at_end = steps == config.iterations
        checked = (steps >= 1) & ((steps - 1) % config.check_every == 0)
        converged = checked & (loss < config.tolerance)
        # NaN for good (see _published_steps): every entry of the row's own
        # variable, which for a row that reads its labels ends at the input.
        z = optimiser.z
        dead = torch.isnan(z[:, : objective.input_size]).all(1)
        if objective.learns_labels:
            logits_dead = torch.isnan(z[:, objective.input_size :]).all(1)
            dead &= logits_dead | ~learns[rows]
        done = start & (at_end | converged | dead)
        for i in start.nonzero().flatten().tolist():
            victim, k = victims[int(rows[i])], int(steps[i])
            if k % config.snapshot_every == 0:
                _snapshot(victim, objective, k, optimiser.z[i])
            value = float(loss[i])
            if k >= 1:
                victim.history.append(value)
            if bool(done[i]):
                if bool(dead[i]) and not bool(converged[i]):
                    victim.history.extend([math.nan] * (config.iterations - k))
                    k = config.iterations
                label = victim.label.reshape(-1) if victim.label is not None else None
                _finish(victim, objective, optimiser.z[i], value, label, steps=k,
                        tolerance=config.tolerance, dtype=out_dtype)  # fmt: skip
                if on_result is not None:
                    on_result(int(rows[i]), victim.result)  # type: ignore[arg-type]
        ended = optimiser.advance(loss, g, ~done)
        steps += ended.long()
        if bool(done.any()):
            # Waiting victims take over finished rows in place; rows left over
            # once the queue is empty are removed.
            free = done.nonzero().flatten()
            joining, waiting = waiting[: len(free)], waiting[len(free) :]
            taken, free = free[: len(joining)], free[len(joining) :]
            if len(joining):
                rows[taken] = joining
                steps[taken] = 0
                optimiser.replace(taken, z0[joining])
            if len(free):
                keep = torch.ones_like(done)
                keep[free] = False
                keep = keep.nonzero().flatten()
                rows, steps = rows[keep], steps[keep]
                optimiser.keep(keep)
            objective.select(rows)


def _improved(
    config: AttackConfig,
    objective: BatchedObjective,
    victims: list[_Victim],
    z0: torch.Tensor,
    on_result: Callable[[int, Reconstruction], None] | None,
) -> None:
    per_step = config.max_iter  # inner iterations that make one reported "step"
    budget = config.iterations * per_step
    patience = config.patience * per_step
    optimiser = RobustLBFGS(z0, lr=config.lr, history=config.history_size)
    rows = torch.arange(len(victims), device=z0.device)
    norms = objective.squared_norms()
    floor = config.restart_above * norms
    tolerance = config.relative_tolerance * norms
    done_before = torch.zeros(len(victims), dtype=torch.long, device=z0.device)  # iterations
    best_recent = torch.full_like(floor, float("inf"))
    since = torch.zeros_like(done_before)
    while rows.numel():
        loss, g = objective(optimiser.points)
        for r in rows.tolist():
            victims[r].evaluations += 1
        moved = optimiser.advance(loss, g, torch.ones_like(rows, dtype=torch.bool))
        current = optimiser.loss
        total = done_before + optimiser.iterations
        improved = moved & (current < 0.9 * best_recent)
        best_recent = torch.where(improved, current, best_recent)
        since = torch.where(improved, 0, torch.where(moved, since + 1, since))
        converged = moved & (current < tolerance)
        warm = ~cold_rows(victims, rows)
        stalled = moved & (since >= torch.where(warm, WARM_PATIENCE * per_step, patience))
        out = total >= budget
        evals_out = torch.tensor([victims[r].evaluations for r in rows.tolist()]) >= 3 * budget
        diverged = moved & ~torch.isfinite(current)
        # A run that stalls after a closed-form start stops there: the start was
        # the answer up to what the shared gradient's precision allows, and a
        # random restart would only land further away.
        restart = (diverged | (stalled & (current > floor) & ~warm)) & ~converged & ~out
        done = converged | out | evals_out.to(out.device) | (stalled & ~restart)
        boundary = moved & (optimiser.iterations % per_step == 0)
        for i in (boundary | done | restart).nonzero().flatten().tolist():
            victim = victims[int(rows[i])]
            step = -(-int(total[i]) // per_step)
            value = float(current[i])
            if bool(boundary[i]):
                if math.isfinite(value):
                    victim.history.append(value)
                if (int(optimiser.iterations[i]) // per_step) % config.snapshot_every == 0:
                    _snapshot(victim, objective, step, optimiser.z[i])
            out_of_restarts = victim.restarts >= config.max_restarts
            if bool(done[i]) or (bool(restart[i]) and out_of_restarts):
                label = victim.label.reshape(-1) if victim.label is not None else None
                _finish(victim, objective, optimiser.z[i], value, label, steps=step,
                        tolerance=float(tolerance[i]), dtype=objective.output_dtype)  # fmt: skip
                done[i] = True
                if on_result is not None:
                    on_result(int(rows[i]), victim.result)  # type: ignore[arg-type]
            elif bool(restart[i]):
                if victim.best is None or _better(value, victim.best[0]):
                    victim.best = (value, optimiser.z[i].clone())
                victim.restarts += 1
                victim.warm = False
                victim.snapshots.clear()
                fresh = _draw(objective, config, victim.generator, victim.learns)
                fresh = fresh.to(z0.device, z0.dtype)
                mask = torch.zeros_like(done)
                mask[i] = True
                optimiser.restart(mask, fresh.expand_as(optimiser.z))
                done_before[i] = total[i]
                optimiser.iterations[i] = 0
                best_recent[i], since[i] = float("inf"), 0
        if bool(done.any()):
            keep = (~done).nonzero().flatten()
            rows, done_before = rows[keep], done_before[keep]
            best_recent, since = best_recent[keep], since[keep]
            floor, tolerance = floor[keep], tolerance[keep]
            optimiser.keep(keep)
            objective.select(rows)
