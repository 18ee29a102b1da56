"""`gradleak audit CAPTURES`: attack every client of every round of a captured Flower run.

The driver reads the capture (`integrations.reader`), plans one target per
node and round (or per round, when the server got only an aggregate;
`load.plan_items`), checks each target by loading it once (a tampered, cut
off or missing file, a sidecar pointing outside the folder, arrays that do
not fit the model: one line each, the target left out), then runs the good
ones as one sweep on the runner (`sweep/`: resumable, `--workers`, `--ray`),
one target per group.  A task rebuilds its target from the capture folder
(the folder must be reachable where the task runs, as data folders are),
chooses the attack (`choose.choose_attack`), runs it and sends back its row
and its strip frames.  The report (`report.py`) is written from the stored
rows: leakage.json, report.md and a PNG strip per target.

Ground truth: where the capture holds the clients' own batches (only
`gradleak flower-demo` writes them, under ``CAPTURES/private/``), a row has
MSE, PSNR, SSIM and label accuracy against them, and the cosine between the
update the server received and the one the client computed (what DP did to
it); elsewhere those are null.

Seeds: the attack's dummy start of a target comes from
``SeedSequence([seed, round, node id])`` (node 0 for an aggregate).
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gradleak
from gradleak import metrics
from gradleak.attacks.auto import one_step_gradient
from gradleak.attacks.imprint import plan_from_json
from gradleak.attacks.labels import batch_labels, update_label_counts
from gradleak.errors import AttackNotApplicable, ConfigError, DataError, GradleakError
from gradleak.experiments.audit import report
from gradleak.experiments.audit.choose import IG_TV_SCALE, METHODS, choose_attack
from gradleak.experiments.audit.line import SIZES, find_line
from gradleak.experiments.audit.load import (
    ClientSchedule,
    Item,
    Target,
    build_from_info,
    load_target,
    plan_items,
)
from gradleak.experiments.common import finite_or_none, use_cpu_threads
from gradleak.integrations.capture import ModelInfo
from gradleak.integrations.reader import Capture, Exchange, read_capture, read_exchanges
from gradleak.models.user import fingerprint
from gradleak.outdir import prepare_out
from gradleak.sweep.executors import make_executor
from gradleak.sweep.runner import Emit, Group, run_sweep
from gradleak.sweep.store import RESULTS, FolderLock, ResultsStore, pin_run
from gradleak.threat import observe_update
from gradleak.types import Observation, Reconstruction, UpdateObservation

log = logging.getLogger(__name__)

# A reconstruction this close to its original (mean squared error per pixel) counts as rebuilt.
REBUILT_MSE = 1e-3
# A reconstruction counts as recognisable at this PSNR (dB) or this SSIM against its original.
RECOGNISABLE_PSNR = 20.0
RECOGNISABLE_SSIM = 0.6
# Images are attacked for clients of at most this many examples by default: Inverting
# Gradients on an unrolled update of n examples costs about n forward-backward passes a step.
MAX_EXAMPLES = 16
PINNED = (
    "captures", "capture_started", "method", "iterations", "tv_scale", "seed", "model",
    "schedule", "max_examples",
)  # fmt: skip

ProgressCallback = Callable[[str, float, int], None]


@dataclass(frozen=True)
class AuditRun:
    """One `gradleak audit` invocation.

    Attributes:
        captures: The capture folder LeakageAudit wrote.
        out: Where the report goes.
        method: "auto" (the chooser), or "idlg", "dlg", "ig".
        iterations: Optimiser steps per attack (None: the method's own).
        tv_scale: Inverting Gradients' total-variation weight.
        model: The clients' model, when the capture does not name it (or to override it).
        seed: Fixes every attack's dummy start.
        workers: Worker processes (None: one per core; 1: this process).
        ray: Run the attacks as Ray tasks: "local", "auto" or "HOST:PORT".
        command: The command line, quoted in the report.
        schedule: What the operator knows of the clients' training beyond the
            train config (the app's run config, the optimiser).
        max_examples: Rebuild images only for clients of at most this many
            examples (an unrolled update costs in proportion to them); the
            labels are read for every client.
        line_data: A dataset (name or folder) to find where images come back
            for this model and schedule (`line.find_line`); None: no sweep.
        line_data_dir: Where that dataset's files are.
        line_sizes: The client sizes of that sweep.
    """

    captures: str
    out: str = "runs/audit"
    method: str = "auto"
    iterations: int | None = None
    tv_scale: float = IG_TV_SCALE
    model: ModelInfo | None = None
    seed: int = 0
    workers: int | None = None
    ray: str | None = None
    command: str = ""
    schedule: ClientSchedule = ClientSchedule()
    max_examples: int = MAX_EXAMPLES
    line_data: str | None = None
    line_data_dir: str | None = None
    line_sizes: tuple[int, ...] = SIZES

    def __post_init__(self) -> None:
        if self.max_examples < 0:
            raise ConfigError(f"--max-examples must be 0 or more, got {self.max_examples}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method '{self.method}': choose one of {', '.join(METHODS)}")
        if self.iterations is not None and self.iterations < 1:
            raise ConfigError(f"--iterations must be 1 or more, got {self.iterations}")
        if not (math.isfinite(self.tv_scale) and self.tv_scale >= 0):
            raise ConfigError(f"--tv-scale must be a number 0 or more, got {self.tv_scale:g}")
        if self.seed < 0:
            raise ConfigError(f"--seed must be 0 or more, got {self.seed}")


@dataclass(frozen=True)
class Work:
    """What every task gets: the run, the capture's header and the model to build."""

    run: AuditRun
    capture: Capture
    model: ModelInfo


@dataclass(frozen=True)
class AuditResult:
    """What the command prints: the summary written, and the refused captures (one line each)."""

    summary: dict[str, Any]
    problems: tuple[str, ...]


def run_audit(run: AuditRun, *, callback: ProgressCallback | None = None) -> AuditResult:
    """Audit a capture folder; write results.jsonl, leakage.json, report.md and the strips.

    Returns:
        The summary and the problems (captures refused); the caller exits 2 if there are any.

    Raises:
        DataError: No readable capture at `run.captures`.
        ConfigError: No model known, or a folder holding another run.
    """
    started = time.perf_counter()
    capture = read_capture(run.captures)
    capture = replace(capture, folder=capture.folder.resolve())
    model = _the_model(run, capture)
    exchanges, unreadable = read_exchanges(capture)
    items, notes = plan_items(exchanges)
    by_sidecar = {e.sidecar: e for e in exchanges}
    good: list[tuple[Item, tuple[Exchange, ...], bool]] = []
    problems = [r.reason for r in unreadable]
    refused = [report.unreadable_entry(r) for r in unreadable]
    for item in items:
        parts = tuple(by_sidecar[s] for s in item.sidecars)
        try:
            load_target(capture, by_sidecar, item, model, with_truth=False, schedule=run.schedule)
        except GradleakError as error:
            problems.append(str(error))
            refused.append(report.refused_entry(item, parts, str(error)))
            continue
        try:
            load_target(capture, by_sidecar, item, model, schedule=run.schedule)
            with_truth = True
        except GradleakError as error:
            problems.append(f"{error} (scores left null)")
            with_truth = False
        good.append((item, parts, with_truth))
    if capture.malicious is not None and good:
        # One line, before any attack, if the header's plan does not fit the weights sent.
        malicious_decoder(
            load_target(capture, by_sidecar, good[0][0], model, with_truth=False,
                        schedule=run.schedule),
            capture.malicious,
        )  # fmt: skip
    out = prepare_out(run.out)
    with FolderLock(out):
        pin_run(out, _params(run, capture, model), pinned=PINNED)
        store = ResultsStore(out / RESULTS, key=lambda row: row["item"])
        work = Work(run, capture, model)
        groups = [Group((item.key,), (item, parts, truth)) for item, parts, truth in good]

        def progress(done: int, total: int) -> None:
            if callback is not None:
                callback("attacks", done, total)

        points: list[dict[str, Any]] | None = None
        with make_executor(run.workers, run.ray) as executor:
            try:
                run_sweep(store, groups, audit_target, work, executor, progress=progress)
                if run.line_data is not None and good:
                    points = _line(run, capture, by_sidecar, good, model, callback)
            finally:
                context = _context(run, capture, model, executor.name, started)
                context["line"] = points
                summary = report.write_all(out, store.rows, refused, notes, problems, context)
    return AuditResult(summary, tuple(problems))


def _line(
    run: AuditRun,
    capture: Capture,
    exchanges: dict[str, Exchange],
    good: list[tuple[Item, tuple[Exchange, ...], bool]],
    model: ModelInfo,
    callback: ProgressCallback | None,
) -> list[dict[str, Any]]:
    """The sweep over client sizes, on the first individual client's round and schedule."""
    item = next((i for i, _, _ in good if not i.aggregate), good[0][0])
    target = load_target(capture, exchanges, item, model, with_truth=False, schedule=run.schedule)
    points = find_line(
        target, run.line_data, data_dir=run.line_data_dir, sizes=run.line_sizes,
        method=run.method, iterations=run.iterations, tv_scale=run.tv_scale, seed=run.seed,
        psnr_bar=RECOGNISABLE_PSNR, ssim_bar=RECOGNISABLE_SSIM, callback=callback,
    )  # fmt: skip
    return [p.to_json() | {"round": item.round} for p in points]


def audit_target(work: Work, spec: tuple[Item, tuple[Exchange, ...], bool], emit: Emit) -> None:
    """The sweep task: load one target, choose and run its attack, emit its row and frames."""
    item, parts, with_truth = spec
    use_cpu_threads(torch.device("cpu"))
    run = work.run
    target = load_target(
        work.capture, {e.sidecar: e for e in parts}, item, work.model, with_truth=with_truth,
        schedule=run.schedule,
    )  # fmt: skip
    seed_key = [run.seed, item.round, 0 if item.aggregate else item.node_ids[0]]
    seed = int(np.random.SeedSequence(seed_key).generate_state(1)[0])
    start = time.perf_counter()
    result: Reconstruction | None = None
    counts = read_label_counts(target)
    if work.capture.malicious is not None:
        row, shown = malicious_row(target, work.capture.malicious, start)
        strips = {} if shown is None else {report.frames_file(item): shown}
        emit(row | label_row(target, counts), strips)
        return
    if target.num_examples > run.max_examples:
        method, error = "labels", None
        reason = (
            f"labels only: images are attacked for clients of at most --max-examples "
            f"{run.max_examples} examples"
        )
    else:
        try:
            choice = choose_attack(
                target.observation,
                method=run.method,
                clipped=target.clipped,
                iterations=run.iterations,
                tv_scale=run.tv_scale,
            )
            method, reason = choice.method, choice.reason
            result, error = choice.attack(choice.observation, seed=seed), None
        except AttackNotApplicable as failure:
            method, reason, error = run.method, "", str(failure)
    row = result_row(target, result, method, reason, time.perf_counter() - start, error)
    row |= label_row(target, counts)
    row["verdict"] = client_verdict(row)
    emit(row, {report.frames_file(item): frames(target, result, row)})


# An example the dishonest server's decoder gives back this close (MSE per pixel) is exact.
EXACT_MSE = 1e-4
MALICIOUS_SHOWN = 16  # images of a target in its strip (one row of them)


def malicious_decoder(target: Target, plan: dict[str, Any]) -> tuple[Any, Any]:
    """The dishonest server's decoder and plan, from the header's JSON and the weights it sent.

    Raises:
        DataError: The plan does not fit the weights the capture recorded (a tampered header).
    """
    try:
        return plan_from_json(plan, target.observation.model)
    except AttackNotApplicable as failure:
        raise DataError(
            f"the dishonest server's plan in the capture's header does not fit the weights it "
            f"sent ({failure}); the header was changed: rerun the demo into a new --out"
        ) from None


def malicious_row(
    target: Target, plan: dict[str, Any], started: float
) -> tuple[dict[str, Any], bytes | None]:
    """What the dishonest server read from one reply (or aggregate) with the decoder it
    planned, at the resolution its crafted layers let through; and the strip's frames:
    the private images reduced the same way beside what was read back; `started` is when
    the task began (perf_counter)."""
    observation = target.observation
    if isinstance(observation, UpdateObservation):
        observation = one_step_gradient(observation)
    attack, decoder = malicious_decoder(target, plan)
    front = decoder.front
    error, read = None, None
    try:
        read = attack.decode(observation, decoder)
    except AttackNotApplicable as failure:
        error = str(failure)
    why = "the dishonest server's decoder"
    if front is not None and front.batchnorm and observation.batchnorm == "train":
        why += (
            " (train-mode BatchNorm: each channel comes back up to one affine map of the batch's "
            "statistics, estimated from the server's own images, so not exact)"
        )
    seconds = time.perf_counter() - started  # rebuilding the decoder and decoding
    row = result_row(target, None, attack.name, why, seconds, error)
    row["resolution"] = "full" if front is None else front.resolution
    row["recovered_bins"] = None if read is None else len(read.inputs)
    if read is None or target.truth is None:
        return row, None
    recovered = read.inputs.detach().cpu().float()
    images, labels = target.truth
    # Exact at the stated resolution: against the originals reduced the way the crafted
    # convolutions reduce them (block means or maxima); at full resolution without a front.
    reduced = images if front is None else front.reduce(images).float()
    errors = ((recovered[:, None] - reduced[None]) ** 2).flatten(2).mean(-1)
    best, which = errors.min(0)
    exact = int((best < EXACT_MSE).sum())
    psnr = [metrics.psnr(recovered[j], reduced[i]) for i, j in enumerate(which.tolist())]
    finite = [p for p in psnr if math.isfinite(p)]
    row |= {
        "true_labels": sorted(int(v) for v in labels),
        "per_image_mse": [finite_or_none(float(v)) for v in best],
        "mse": finite_or_none(float(best.mean())),
        "psnr": finite_or_none(sum(finite) / len(finite)) if finite else None,
        "images_rebuilt": exact,
        "images_recognisable": exact,
        "verdict": f"{exact} of {len(best)} images read back exactly by the dishonest server"
        + ("" if front is None else f" ({front.resolution})"),
    }
    if attack.name == "output-rows":  # the rows are classes: the labels come with them
        read_labels = [int(v) for v in read.labels]
        held = np.bincount(labels.numpy(), minlength=observation.num_classes)
        found = np.bincount(np.array(read_labels, dtype=np.int64), minlength=len(held))
        row["predicted_labels"] = sorted(read_labels)
        # A class read once per class held (the rows do not count the examples in a class).
        row["label_accuracy"] = float(np.minimum(held, found).sum() / len(labels))
    shown = min(len(best), MALICIOUS_SHOWN)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        recovered=recovered[which[:shown]].clamp(0, 1).numpy(),
        labels=read.labels[which[:shown]].numpy().astype(np.int64),
        originals=reduced[:shown].clamp(0, 1).numpy(),
        true=labels[:shown].numpy().astype(np.int64),
    )
    return row, buffer.getvalue()


def read_label_counts(target: Target) -> np.ndarray | None:
    """How many examples of each class the server reads from the reply, or None if it cannot."""
    observation = target.observation
    try:
        if isinstance(observation, UpdateObservation):
            counts = update_label_counts(observation)
        else:
            labels = batch_labels(observation)
            counts = torch.bincount(labels.cpu(), minlength=observation.num_classes)
    except AttackNotApplicable:
        return None
    return counts.cpu().numpy().astype(np.int64)


def label_row(target: Target, counts: np.ndarray | None) -> dict[str, Any]:
    """The label histogram read, against the truth where the capture holds it.

    ``histogram_error`` is the share of the client's examples the read
    histogram puts in a wrong class (half the L1 distance over n: 0 exact, 1
    all wrong); ``class_set_exact`` whether the classes read are exactly the
    classes held.
    """
    row: dict[str, Any] = {
        "label_counts_read": None if counts is None else _histogram(counts),
        "label_counts_true": None,
        "histogram_error": None,
        "class_set_exact": None,
    }
    if target.truth is None or counts is None:
        return row
    _, labels = target.truth
    true = np.bincount(labels.numpy(), minlength=len(counts))
    return row | {
        "label_counts_true": _histogram(true),
        "histogram_error": float(np.abs(true - counts).sum() / (2 * len(labels))),
        "class_set_exact": bool(np.array_equal(true > 0, counts > 0)),
    }


def _histogram(counts: np.ndarray) -> dict[str, int]:
    return {str(c): int(v) for c, v in enumerate(counts) if v > 0}


def client_verdict(row: dict[str, Any]) -> str:
    """What leaked, in a few words: measured where the truth is known, else what was read."""
    if row.get("images_recognisable"):
        return "images"
    if row.get("true_labels") is None and row.get("converged"):
        return "images (matched; no truth to score)"
    if row.get("histogram_error") is not None:
        if row["histogram_error"] <= 0.1:
            return "label histogram"
        if row.get("class_set_exact"):
            return "class set"
        return "nothing measurable"
    return "labels read (no truth to score)" if row.get("label_counts_read") else "nothing read"


def _the_model(run: AuditRun, capture: Capture) -> ModelInfo:
    """The model to audit with: the user's --model, checked against what the capture recorded.

    A capture may name the user's own model by import path; it is never
    imported from there (importing runs code): the user must name it too.
    """
    recorded, given = capture.model, run.model
    if given is None:
        if recorded is None:
            raise ConfigError(
                f"{run.captures}/capture.json names no model: give --model NAME --input-shape "
                "C,H,W --num-classes N, or --model package.module:Name for your own"
            )
        if recorded.user_model:
            raise ConfigError(
                f"the capture was made with your model {recorded.name}; gradleak does not import "
                f"code a capture names: give --model {recorded.name} to confirm it"
            )
        return recorded
    if given.normalize is None and recorded is not None and recorded.normalize is not None:
        given = replace(given, normalize=recorded.normalize)  # the capture says how they normalise
    if not given.user_model:
        return given
    built = build_from_info(replace(given, fingerprint=None, normalize=None))
    mine = fingerprint(built)
    if recorded is not None and recorded.fingerprint is not None and recorded.fingerprint != mine:
        raise ConfigError(
            f"--model {given.name} is not the architecture the clients trained: its fingerprint "
            f"{mine[:19]}... differs from the capture's {recorded.fingerprint[:19]}... "
            f"(recorded model: {recorded.name}); give the app's own model class and arguments"
        )
    return replace(given, fingerprint=mine)


def result_row(
    target: Target,
    result: Reconstruction | None,
    method: str,
    reason: str,
    seconds: float,
    error: str | None,
) -> dict[str, Any]:
    """One line of results.jsonl (and, reordered, of leakage.json)."""
    item = target.item
    row: dict[str, Any] = {
        "item": item.key,
        "round": item.round,
        "node_id": None if item.aggregate else item.node_ids[0],
        "nodes": list(item.node_ids),
        "num_examples": target.num_examples,
        "shared": target.shared,
        "lr": target.lr,
        "local_steps": target.local_steps,
        "epochs": target.epochs,
        "local_batch": target.local_batch,
        "clipping_norm": target.clipping_norm,
        "clipped": target.clipped,
        "update_norm": target.update_norm,
        "update_cosine": None,
        "method": method,
        "reason": reason,
        "true_labels": None,
        "predicted_labels": None,
        "label_accuracy": None,
        "mse": None,
        "psnr": None,
        "ssim": None,
        "per_image_mse": None,
        "images_rebuilt": None,
        "per_image_psnr": None,
        "per_image_ssim": None,
        "images_recognisable": None,
        "matching_loss": None,
        "converged": False,
        "iterations": 0,
        "seconds": round(seconds, 3),
        "error": error,
    }
    if target.truth is not None:
        images, labels = target.truth
        row["true_labels"] = sorted(int(v) for v in labels)
        row["update_cosine"] = finite_or_none(_update_cosine(target))
    if result is None:
        return row
    predicted = [int(v) for v in result.labels]
    row |= {
        "predicted_labels": sorted(predicted),
        "matching_loss": finite_or_none(result.final_loss),
        "converged": bool(result.converged),
        "iterations": int(result.steps),
    }
    if target.truth is None:
        return row
    images, labels = target.truth
    recovered = result.inputs.detach().cpu().float()
    order, per_mse = metrics.match_reconstructions(recovered, images)
    pairs = list(zip(recovered[order], images, strict=True))
    psnr = [metrics.psnr(r, o) for r, o in pairs]
    ssim = [metrics.ssim(r[None], o[None]) for r, o in pairs]
    true_counts = np.bincount(labels.numpy(), minlength=target.observation.num_classes)
    read_counts = np.bincount(np.array(predicted), minlength=target.observation.num_classes)
    return row | {
        "label_accuracy": float(np.minimum(true_counts, read_counts).sum() / len(labels)),
        "mse": finite_or_none(float(np.mean(per_mse))),
        "psnr": finite_or_none(float(np.mean(psnr))),
        "ssim": finite_or_none(float(np.mean(ssim))),
        "per_image_mse": [finite_or_none(v) for v in per_mse],
        "images_rebuilt": sum(1 for v in per_mse if math.isfinite(v) and v < REBUILT_MSE),
        "per_image_psnr": [finite_or_none(v) for v in psnr],
        "per_image_ssim": [finite_or_none(v) for v in ssim],
        "images_recognisable": sum(
            1
            for p, q in zip(psnr, ssim, strict=True)
            if (math.isfinite(p) and p >= RECOGNISABLE_PSNR) or q >= RECOGNISABLE_SSIM
        ),
    }


def frames(target: Target, result: Reconstruction | None, row: dict[str, Any]) -> bytes:
    """A strip's contents: originals (matched order) and reconstructions, with their labels."""
    shape = (0, *target.observation.input_shape)
    recovered = (
        np.zeros(shape, np.float32)
        if result is None
        else result.inputs.detach().cpu().float().numpy()
    )
    labels = [] if result is None else [int(v) for v in result.labels]
    originals, true = np.zeros(shape, np.float32), []
    if target.truth is not None and result is not None:
        images, truth_labels = target.truth
        order, _ = metrics.match_reconstructions(result.inputs.detach().cpu().float(), images)
        recovered, labels = recovered[order], [labels[j] for j in order]
        originals, true = images.numpy(), [int(v) for v in truth_labels]
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        recovered=recovered,
        labels=np.array(labels, dtype=np.int64),
        originals=originals,
        true=np.array(true, dtype=np.int64),
    )
    return buffer.getvalue()


def _update_cosine(target: Target) -> float:
    """Cosine between the update received and the one the client computed from its batch."""
    assert target.truth is not None
    images, labels = target.truth
    observation = target.observation
    if isinstance(observation, Observation):
        from gradleak.threat import client_gradients

        clean = client_gradients(observation.model, images, labels)  # -update/lr: same direction
        received = observation.gradients
    else:
        replay = observe_update(
            observation.model,
            images,
            labels,
            local_lr=observation.local_lr,
            local_steps=observation.local_steps,
            epochs=observation.epochs,
            local_batch=observation.local_batch,
            seed=0,
            optimizer=observation.optimizer,
            drop_last=observation.drop_last,
        )
        clean, received = replay.update, observation.update
    a = torch.cat([t.double().flatten() for t in clean])
    b = torch.cat([t.double().flatten() for t in received])
    return float(a @ b / (a.norm() * b.norm()))


def _params(run: AuditRun, capture: Capture, model: ModelInfo) -> dict[str, Any]:
    return {
        "paper": "audit",
        "captures": str(capture.folder),
        "capture_started": capture.started,
        "method": run.method,
        "iterations": run.iterations,
        "tv_scale": run.tv_scale,
        "seed": run.seed,
        "model": model.to_json(),
        "schedule": run.schedule.to_json(),
        "max_examples": run.max_examples,
        "command": run.command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "gradleak": gradleak.__version__,
        "torch": torch.__version__,
    }


def _context(
    run: AuditRun, capture: Capture, model: ModelInfo, executor: str, started: float
) -> dict[str, Any]:
    return {
        "captures": str(capture.folder),
        "strategy": capture.strategy,
        "stack": capture.stack,
        "model": model.to_json(),
        "method": run.method,
        "iterations": run.iterations,
        "tv_scale": run.tv_scale,
        "seed": run.seed,
        "executor": executor,
        "command": run.command,
        "rebuilt_mse": REBUILT_MSE,
        "recognisable": {"psnr": RECOGNISABLE_PSNR, "ssim": RECOGNISABLE_SSIM},
        "schedule": run.schedule.to_json(),
        "max_examples": run.max_examples,
        "wall_seconds": round(time.perf_counter() - started, 3),
        "date": time.strftime("%Y-%m-%d"),
        "malicious": capture.malicious,
        "gradleak": gradleak.__version__,
        "torch": torch.__version__,
    }


def results_path(out: str | Path) -> Path:
    return Path(out) / RESULTS
