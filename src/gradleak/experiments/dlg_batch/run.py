"""`gradleak reproduce dlg-batch`: DLG's Table 2 (iterations per batch size), resumable.

Per batch size B and experiment e: a fresh uniform-init model (by default
DLG's own LeNet, strides removed: "lenet-dlg") and B distinct random images;
faithful DLG (learns the labels) and gradleak's improved variant (reads the label
multiset, optimises the images in float64) attack
the same mean gradient with the batched engine.  A batch counts as recovered
when, after matching reconstructions to originals by optimal assignment,
every image has MSE below 1e-3 and every matched label is right.

Lines go to results.jsonl as attacks end (one per batch size, experiment,
method); a rerun of the same command skips what is there.  Groups of
`--chunk` experiments per batch size and method run on the sweep runner.

Seeds: ``SeedSequence([seed, dataset_id, B, e]).spawn(4)`` -> model init,
image choice, DLG's dummy, the improved variant's dummy; nothing else
(chunk size, order, resumes) changes an experiment.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import gradleak
from gradleak import metrics
from gradleak.attacks import DLG, IDLG, GradientInversion
from gradleak.data import ImageDataset
from gradleak.errors import ConfigError
from gradleak.experiments.common import (
    absolute_data_dir,
    cached_dataset,
    finite_or_none,
    resolve_device,
)
from gradleak.experiments.dlg_batch import report
from gradleak.outdir import prepare_out
from gradleak.sweep.executors import make_executor
from gradleak.sweep.runner import Emit, Group, chunked, run_sweep
from gradleak.sweep.store import RESULTS, FolderLock, ResultsStore, pin_run, read_results
from gradleak.threat import observe
from gradleak.types import Observation, Reconstruction

__all__ = ["DATASETS", "METHODS", "BatchRun", "parse_batch_sizes", "run_reproduce_batch"]

log = logging.getLogger(__name__)

DATASETS = ("cifar100", "mnist", "sample-cifar100")
METHODS = ("dlg", "improved")
# DLG's model has its strides removed; iDLG's strided LeNet ("lenet") gives
# the attack too few equations to pin down a CIFAR batch (see the README).
MODELS = ("lenet-dlg", "lenet", "resnet20", "resnet56")
RECOVERED_MSE = 1e-3
SEEDING = (
    "numpy SeedSequence([seed, dataset_id, batch_size, experiment]).spawn(4) -> model, "
    "image choice, dlg, improved; dataset_id = position in " + ",".join(DATASETS)
)

# callback(batch size, experiments done, experiments asked for); an experiment
# counts 1/len(methods) for each method finished.
ProgressCallback = Callable[[int, float, int], None]


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` -> ``(1, 2, 4, 8)``; anything else is a `ConfigError`."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(
            f"--batch-sizes expects whole numbers 1 or more, e.g. 1,2,4,8; got {text!r}"
        )
    return tuple(dict.fromkeys(int(p) for p in parts))


@dataclass(frozen=True)
class BatchRun:
    """One `gradleak reproduce dlg-batch` invocation.

    Attributes:
        batch_sizes: The batch sizes B to run.
        experiments: Experiments per batch size.
        dataset: "cifar100" (the paper's), "mnist" or "sample-cifar100".
        model: One of `MODELS`; DLG's stride-free LeNet by default.  The
            ResNets have BatchNorm, which the batched engine cannot vmap:
            they are attacked one victim at a time.
        data_dir: Folder with the dataset's files (None: the default).
        methods: Which of "dlg" (faithful) and "improved" to run.
        iterations: L-BFGS steps at most per attack.
        seed: Fixes every random choice.
        out: Output folder.
        chunk: Victims attacked at once.
        device: "auto", "cpu" or "cuda".
        command: The command line, quoted in the report.
        workers: Worker processes (None: one per CPU core; 1: this process).
        ray: Run the groups as Ray tasks: "local", "auto" or "HOST:PORT".
    """

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    experiments: int = 100
    dataset: str = "cifar100"
    model: str = MODELS[0]
    data_dir: str | None = None
    methods: tuple[str, ...] = METHODS
    iterations: int = 300
    seed: int = 0
    out: str = "runs/reproduce-dlg-batch"
    chunk: int = 16
    device: str = "auto"
    command: str = ""
    workers: int | None = None
    ray: str | None = None

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError("--batch-sizes must be whole numbers 1 or more")
        if self.dataset not in DATASETS:
            raise ConfigError(
                f"unknown dataset '{self.dataset}': choose one of {', '.join(DATASETS)}"
            )
        if self.model not in MODELS:
            raise ConfigError(f"unknown model '{self.model}': choose one of {', '.join(MODELS)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(f"unknown method '{','.join(bad)}': choose from {', '.join(METHODS)}")
        if min(self.experiments, self.chunk, self.iterations) < 1 or self.seed < 0:
            raise ConfigError(
                "--experiments, --chunk and --iterations must be 1 or more, --seed 0 or more"
            )


@dataclass(frozen=True)
class BatchVictim:
    """One experiment's private batch and the mean gradient it shared."""

    batch_size: int
    experiment: int
    indices: tuple[int, ...]
    images: torch.Tensor
    labels: tuple[int, ...]
    observation: Observation
    attack_seeds: dict[str, int]


def make_victim(
    data: ImageDataset, run: BatchRun, batch_size: int, experiment: int, device: torch.device
) -> BatchVictim:
    """Experiment `experiment` at `batch_size`: a fresh model, B distinct images, their gradient."""
    key = [run.seed, DATASETS.index(run.dataset), batch_size, experiment]
    model_seed, index_seed, *attack = (
        int(s.generate_state(1)[0]) for s in np.random.SeedSequence(key).spawn(4)
    )
    if batch_size > len(data):
        raise ConfigError(
            f"batch size {batch_size} is larger than the dataset ({len(data)} images)"
        )
    chosen = np.random.default_rng(index_seed).choice(len(data), batch_size, replace=False)
    indices = tuple(int(i) for i in chosen)
    pairs = [data[i] for i in indices]
    images = torch.stack([image for image, _ in pairs])
    labels = tuple(int(label) for _, label in pairs)
    model = build_victim_model(run.model, data, model_seed).to(device)
    observation = observe(model, images.to(device), torch.tensor(labels, device=device))
    return BatchVictim(
        batch_size,
        experiment,
        indices,
        images,
        labels,
        observation,
        dict(zip(METHODS, attack, strict=True)),
    )


def build_victim_model(name: str, data: ImageDataset, seed: int) -> torch.nn.Module:
    """A fresh model `name` for `data` (LeNets: uniform [-0.5, 0.5] init)."""
    from gradleak.models import build_model

    return build_model(name, input_shape=data.shape, num_classes=data.num_classes, seed=seed)


def build_attacks(run: BatchRun) -> dict[str, GradientInversion]:
    """Faithful DLG and the improved variant, both capped at `run.iterations` steps."""
    return {
        "dlg": DLG(iterations=run.iterations),
        "improved": IDLG(improved=True, iterations=run.iterations),
    }


def result_row(
    victim: BatchVictim, method: str, result: Reconstruction, seconds: float
) -> dict[str, Any]:
    """One line of results.jsonl, reconstructions matched to originals."""
    permutation, mses = metrics.match_reconstructions(result.inputs.cpu(), victim.images)
    predicted = [int(result.labels[j]) for j in permutation]
    exact = predicted == list(victim.labels)
    per_image = [finite_or_none(m) for m in mses]
    return {
        "batch_size": victim.batch_size,
        "experiment": victim.experiment,
        "method": method,
        "image_indices": list(victim.indices),
        "true_labels": list(victim.labels),
        "predicted_labels": predicted,
        "labels_exact": exact,
        "per_image_mse": per_image,
        "recovered": exact and all(m is not None and m < RECOVERED_MSE for m in per_image),
        "iterations": result.steps,
        "evaluations": result.evaluations,
        "converged": result.converged,
        "seconds": round(seconds, 4),
    }


def run_reproduce_batch(
    run: BatchRun, *, callback: ProgressCallback | None = None
) -> dict[str, Any]:
    """Run (or resume) the reproduction; write results.jsonl, summary.json, plots, report.md.

    Returns:
        The summary, as written to summary.json.
    """
    started = time.perf_counter()
    device = resolve_device(run.device)
    data = cached_dataset(run.dataset, run.data_dir)
    out = prepare_out(run.out)
    if max(run.batch_sizes) > len(data):
        raise ConfigError(
            f"batch size {max(run.batch_sizes)} is larger than the dataset ({len(data)} images)"
        )
    with FolderLock(out), make_executor(run.workers, run.ray) as executor:
        pin_run(out, _pinned(run, len(data)))
        store = ResultsStore(out / RESULTS, key=row_key)

        def summarise() -> dict[str, Any]:
            context = _context(run, device, time.perf_counter() - started, executor)
            return report.summarise(
                store.rows, run.batch_sizes, run.experiments, run.methods, **context
            )

        def on_row(row: dict[str, Any]) -> None:
            if len(store.rows) % run.chunk == 0:
                report.write_summary(out, summarise())

        work = dataclasses.replace(run, data_dir=absolute_data_dir(run.data_dir))
        for size in run.batch_sizes:

            def progress(done: int, items: int, size: int = size) -> None:
                if callback is not None:
                    callback(size, done / len(run.methods), run.experiments)

            groups = [
                Group(tuple((size, e, method) for e in part), (size, method, tuple(part)))
                for method in run.methods
                for part in chunked(range(run.experiments), run.chunk)
            ]
            try:
                run_sweep(store, groups, attack_group, work, executor, on_row=on_row,
                          progress=progress)  # fmt: skip
            except BaseException:
                report.write_summary(out, summarise())  # what was done, however it ends
                raise
        summary = summarise()
        report.write_summary(out, summary)
        report.write_report(out, summary)
    return summary


def row_key(row: Mapping[str, Any]) -> tuple[int, int, str]:
    """A line's identity: batch size, experiment, method."""
    return int(row["batch_size"]), int(row["experiment"]), str(row["method"])


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read results.jsonl; unlike `reproduce_idlg`'s, a line's key includes its batch size.

    Raises:
        DataError: A complete line is not a result line (the file was edited).
    """
    return read_results(path, key=row_key)


def attack_group(run: BatchRun, spec: tuple[int, str, tuple[int, ...]], emit: Emit) -> None:
    """The sweep task: one batch size's victims, attacked together by one method.

    Models with buffers (BatchNorm) cannot be vmapped: their victims go
    through the sequential engine, one after another.  A row's seconds are
    the wall time since the previous result of its group (their sum is the
    group's time: the victims share it).
    """
    size, method, experiments = spec
    device = resolve_device(run.device)
    data = cached_dataset(run.dataset, run.data_dir)
    victims = [make_victim(data, run, size, e, device) for e in experiments]
    attack = build_attacks(run)[method]
    last = time.perf_counter()

    def save(index: int, result: Reconstruction) -> None:
        nonlocal last
        now = time.perf_counter()
        victim = victims[index]
        files = None
        if victim.experiment == report.STRIP_EXPERIMENT:
            files = {report.strip_name(size, method): report.strip_batch(victim.images, result)}
        emit(result_row(victim, method, result, now - last), files)
        last = now

    observations = [v.observation for v in victims]
    seeds = [v.attack_seeds[method] for v in victims]
    if any(True for _ in observations[0].model.buffers()):
        for index, (observation, seed) in enumerate(zip(observations, seeds, strict=True)):
            save(index, attack(observation, seed=seed))
        return
    from gradleak.attacks.engine import attack_batch

    attack_batch(attack, observations, seeds, on_result=save)


def _pinned(run: BatchRun, size: int) -> dict[str, Any]:
    """run.json: fixed at the first start; a rerun must match its pinned keys."""
    return {
        "paper": "dlg-batch",
        "dataset": run.dataset,
        "mode": f"iterations={run.iterations}",
        "seed": run.seed,
        "model": run.model,
        "dataset_size": size,
        "seeding": SEEDING,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": run.command,
        "gradleak": gradleak.__version__,
        "torch": torch.__version__,
    }


def _context(run: BatchRun, device: torch.device, wall: float, executor: Any) -> dict[str, Any]:
    return {
        "executor": executor.name,
        "dataset": run.dataset,
        "model": run.model,
        "iterations_cap": run.iterations,
        "device": str(device),
        "seed": run.seed,
        "chunk": run.chunk,
        "command": run.command,
        "wall_seconds": round(wall, 3),
        "torch": torch.__version__,
        "gradleak": gradleak.__version__,
    }
