"""`gradleak reproduce ig`: Inverting Gradients per setting, a table in the manner of Geiping et al.

Geiping, Bauermeister, Droege, Moeller, "Inverting Gradients - How easy is it
to break privacy in federated learning?", NeurIPS 2020.  The paper reports
PSNR per setting (trained or untrained network, images per client, local
steps); this sweep measures the same quantities on the data at hand.

Cells: dataset x weights x batch size B x local steps K, and N experiments
in each.

* weights "untrained": a fresh model per experiment (seeded, PyTorch's default
  init); "trained": one model per dataset, trained by this command before any
  attack with `gradleak train`'s recipe (`experiments/train/run.py`: Adam,
  80/20 seeded split of the test split at hand, `--train-epochs`,
  `--train-limit`; `--train-epochs` defaults per dataset, `TRAIN_EPOCHS`) into
  ``OUT/<dataset>-<model>.safetensors``; a rerun finds
  the file and reuses it (its header must say it was trained with these
  settings).  Its test accuracy (on the other 20%) goes into the report.
* K = 1: the client shares the gradient of its whole batch (FedSGD,
  `threat.observe`).  K > 1: it runs K steps of plain SGD at `--local-lr`
  (default 1e-3, breaching's FedAvg user) on mini-batches of max(1, B // 2)
  images and sends the update (FedAvg, `threat.observe_update`, its order of
  mini-batches its secret): for B >= 2 and K = 4 that is two epochs of two
  mini-batches, the setting of breaching's FedAvg example (4 images, 4 steps
  of 2 images); for B = 1, K steps on the one image.
* The client's BatchNorm mode, `--batchnorm`: "eval" (default: the running
  statistics the server sent, breaching's "public buffers"; the paper's code
  computes the gradient in eval mode, and so do the peers' figures) or
  "train" (BatchNorm normalises with the client's batch statistics, as a
  client that calls ``model.train()``; `gradleak attack`'s default).
* The model: `convnet` at `--width` 16 (breaching's ConvNet width is 32, a
  step there costs about four times as much: `bench/ig_table_cost.py`).  The
  width decides how much the gradient holds: on the same 16 trained
  CIFAR-100 victims (one image, one step, eval mode) width 8 gave 11.6 dB
  mean at 500 steps, width 32 18.7 dB at 300 (README, "An Inverting Gradients
  table").
* The attack: `InvertingGradients` (cosine distance + total variation, signed
  Adam at 0.1 with step decay, boxed pixels, one trial), `--iterations` steps
  (default 200: the paper's 24,000 would take days for the table on a CPU;
  the step decay follows the run's length), TV scale `--tv-scale` (default
  0.2, the attack's own, breaching's ImageNet value; breaching's CIFAR
  notebooks use 1e-3 and 5e-4 with 24,000 steps.  In 2,000 steps 0.2 scored
  higher: on an untrained convnet width 8, one image, two seeds, MNIST 7.3
  and 6.2 dB at 0.2 vs 5.5 and 5.6 at 1e-3, CIFAR-100 10.0 and 8.9 vs 8.7
  and 8.4), labels inferred from the gradient or update, never given.
* Victims: B distinct images drawn from the held-out 20% of the seeded
  80/20 split (`train.split_indices(size, seed)`, without `--train-limit`),
  so the trained model never saw them; every cell draws from the same part.

Seeds: ``SeedSequence([seed, dataset_id, B, e]).spawn(4)`` -> image choice,
untrained model init, the client's mini-batch order, the attack's dummy.
The weights and K are left out on purpose: the cells of one dataset and B
attack the same images with the same dummy start, so their rows are paired
(trained vs untrained, K = 1 vs K = 4).  Nothing else (chunk size, order,
workers, resumes) changes an experiment.

Rows: one JSON line per experiment, as attacks end (see `result_row`);
images are matched to reconstructions by optimal assignment on MSE, and
PSNR/SSIM are computed per matched pair.

Groups: one per (cell, chunk of `--chunk` experiments), planned from the
settings alone, run on the sweep runner (this process, `--workers`, `--ray`).
A group's task rebuilds its victims and attacks them as one stacked
computation (`attacks/inverting_engine.py`: every victim follows the
sequential attack's steps; the trained cells share one model, which the
engine passes once); a row's seconds are the group's time shared equally.
The trained
weights travel to the workers inside the run's context (bytes), so Ray nodes
need only the data folder.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

import gradleak
from gradleak import metrics
from gradleak.attacks.inverting import IGConfig, InvertingGradients
from gradleak.attacks.inverting_engine import attack_victims
from gradleak.data import ImageDataset
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.experiments.common import (
    absolute_data_dir,
    cached_dataset,
    finite_or_none,
    resolve_device,
)
from gradleak.experiments.reproduce_ig import report
from gradleak.experiments.train.run import TrainRun, run_train, split_indices
from gradleak.models import build_model, read_metadata
from gradleak.outdir import prepare_out
from gradleak.sweep.executors import make_executor
from gradleak.sweep.runner import Emit, Group, chunked, run_sweep
from gradleak.sweep.store import (
    RESULTS,
    RUN,
    FolderLock,
    ResultsStore,
    pin_run,
    read_results,
    write_json,
)
from gradleak.threat import observe, observe_update
from gradleak.types import Observation, Reconstruction, UpdateObservation

__all__ = [
    "DATASETS",
    "MODELS",
    "WEIGHTS",
    "IGRun",
    "estimated_seconds",
    "image_passes",
    "local_batch",
    "parse_names",
    "parse_counts",
    "read_rows",
    "run_reproduce_ig",
]

log = logging.getLogger(__name__)

DATASETS = ("mnist", "cifar100")
WEIGHTS = ("untrained", "trained")
MODELS = ("convnet", "resnet18")
PAPER_ITERATIONS = 24_000
# Epochs of each dataset's trained model when --train-epochs is not given: one
# pass over MNIST's 8,000 training images already gives ~96% (width 16); the
# 732 CIFAR-100 images need more passes to be more than chance.
TRAIN_EPOCHS = {"mnist": 1, "cifar100": 8}
# The defaults' time: seconds of one worker per image pass (an image through
# the model and the double backward of one objective evaluation) at width 16,
# on this 2-core machine with two workers and another agent's jobs beside them
# (load 3-4): the full default run's attacks (README, "An Inverting Gradients
# table"; 37 minutes wall) took 1.75x what `bench/ig_table_cost.py` measured for
# one process alone (0.030 and 0.042, BENCHMARKS.md).  A pass costs about
# (width / 16) ** 2 of it (3.6x at width 32).  The plain `reproduce ig` must
# finish within DEFAULT_BUDGET_S on DEFAULT_CORES workers (the issue: under an
# hour, aim 40 minutes), training included (TRAIN_SECONDS_PER_IMAGE_EPOCH,
# measured by `gradleak train` alone).
SECONDS_PER_IMAGE_PASS = {"mnist": 0.053, "cifar100": 0.074}
TRAIN_SECONDS_PER_IMAGE_EPOCH = {"mnist": 0.011, "cifar100": 0.016}
DEFAULT_BUDGET_S = 40 * 60
DEFAULT_CORES = 2
SEEDING = (
    "numpy SeedSequence([seed, dataset_id, batch_size, experiment]).spawn(4) -> image choice "
    "(from the held-out 20%), untrained model init, client order, attack dummy; dataset_id = "
    "position in " + ",".join(DATASETS) + "; the weights and the local steps are not in the "
    "key, so the cells of one dataset and batch size attack the same images"
)
# What a rerun on the same folder must share for the lines to mean the same.
PINNED = (
    "paper",
    "seed",
    "model",
    "width",
    "iterations",
    "tv_scale",
    "local_lr",
    "batchnorm",
    "train_epochs",
    "train_limit",
)

# callback(stage, done, total): "train <dataset>" counts optimiser steps, "attacks" rows.
ProgressCallback = Callable[[str, float, int], None]


def parse_counts(text: str, option: str, example: str) -> tuple[int, ...]:
    """``"1,4,8"`` -> ``(1, 4, 8)`` (duplicates dropped); anything else is a `ConfigError`."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(
            f"{option} expects whole numbers 1 or more, e.g. {example}; got {str(text)!r}"
        )
    return tuple(dict.fromkeys(int(p) for p in parts))


def parse_names(text: str, option: str, choices: Sequence[str]) -> tuple[str, ...]:
    """``"mnist,cifar100"`` -> ``("mnist", "cifar100")``, each one of `choices`."""
    parts = [p.strip().lower() for p in str(text).split(",") if p.strip()]
    bad = [p for p in parts if p not in choices]
    if bad or not parts:
        what = bad[0] if bad else str(text)
        raise ConfigError(f"{option}: unknown '{what}': choose from {', '.join(choices)}")
    return tuple(dict.fromkeys(parts))


def local_batch(batch_size: int) -> int:
    """Images per local step of a FedAvg client with B images: max(1, B // 2)."""
    return max(1, batch_size // 2)


@dataclass(frozen=True)
class IGRun:
    """One `gradleak reproduce ig` invocation.

    Attributes:
        datasets: Of `DATASETS`.
        weights: Of `WEIGHTS` ("untrained", "trained").
        batch_sizes: Images per client B.
        local_steps: SGD steps per client K (1: it shares a gradient).
        experiments: Experiments per cell.
        iterations: Adam steps per attack (the paper: 24,000).
        model: "convnet" or "resnet18".
        width: The model's base width.
        local_lr: The FedAvg client's SGD learning rate (K > 1).
        tv_scale: Weight of the attack's total-variation prior.
        batchnorm: The clients' mode, "train" or "eval" (see the module docstring).
        train_epochs: Epochs of the trained model (None: `TRAIN_EPOCHS` of its dataset).
        train_limit: Train on only this many images of the split's permutation
            (None: all; for quick runs and tests).
        data_dir: Folder with the datasets' files (None: the default).
        seed: Fixes every random choice.
        out: Output folder.
        chunk: Experiments per group of work.
        device: "auto", "cpu" or "cuda".
        command: The command line, quoted in the report.
        workers: Worker processes (None: one per CPU core; 1: this process).
        ray: Run the groups as Ray tasks: "local", "auto" or "HOST:PORT".
    """

    datasets: tuple[str, ...] = DATASETS
    weights: tuple[str, ...] = WEIGHTS
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    local_steps: tuple[int, ...] = (1, 4)
    experiments: int = 2
    iterations: int = 200
    model: str = "convnet"
    width: int = 16
    local_lr: float = 1e-3
    tv_scale: float = 0.2
    batchnorm: str = "eval"
    train_epochs: int | None = None
    train_limit: int | None = None
    data_dir: str | None = None
    seed: int = 0
    out: str = "runs/reproduce-ig"
    chunk: int = 4
    device: str = "auto"
    command: str = ""
    workers: int | None = None
    ray: str | None = None

    def __post_init__(self) -> None:
        bad = [d for d in self.datasets if d not in DATASETS]
        if bad or not self.datasets:
            raise ConfigError(
                f"unknown dataset '{','.join(bad)}': choose from {', '.join(DATASETS)}"
            )
        bad = [w for w in self.weights if w not in WEIGHTS]
        if bad or not self.weights:
            raise ConfigError(
                f"--weights: unknown '{','.join(bad)}': choose from trained, untrained"
            )
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError("--batch-sizes must be whole numbers 1 or more, e.g. 1,4,8")
        if not self.local_steps or min(self.local_steps) < 1:
            raise ConfigError("--local-steps must be whole numbers 1 or more, e.g. 1,4")
        if self.model not in MODELS:
            raise ConfigError(
                f"unknown model '{self.model}' for reproduce ig: choose one of {', '.join(MODELS)}"
            )
        if self.width < 1:
            raise ConfigError(f"--width must be 1 or more, got {self.width}")
        epochs = 1 if self.train_epochs is None else self.train_epochs
        if min(self.experiments, self.chunk, self.iterations, epochs) < 1:
            raise ConfigError(
                "--experiments, --chunk, --iterations and --train-epochs must be 1 or more"
            )
        if self.seed < 0:
            raise ConfigError(f"--seed must be 0 or more, got {self.seed}")
        if not (math.isfinite(self.local_lr) and self.local_lr > 0):
            raise ConfigError(f"--local-lr must be a number above 0, got {self.local_lr:g}")
        if not (math.isfinite(self.tv_scale) and self.tv_scale >= 0):
            raise ConfigError(f"--tv-scale must be a number 0 or more, got {self.tv_scale:g}")
        if self.batchnorm not in ("train", "eval"):
            raise ConfigError(f"unknown --batchnorm '{self.batchnorm}': choose train or eval")
        if self.train_limit is not None and self.train_limit < 10:
            raise ConfigError(
                f"--train-limit must be 10 or more (80% to train on, 20% to test), "
                f"got {self.train_limit}"
            )

    def epochs(self, dataset: str) -> int:
        """Epochs of `dataset`'s trained model: `train_epochs`, or the dataset's default."""
        return TRAIN_EPOCHS[dataset] if self.train_epochs is None else self.train_epochs

    @property
    def cells(self) -> list[Cell]:
        """Every cell of the table, in the report's order."""
        return [
            Cell(d, w, b, k)
            for d in self.datasets
            for w in self.weights
            for b in self.batch_sizes
            for k in self.local_steps
        ]


class Cell(NamedTuple):
    """One setting of the table."""

    dataset: str
    weights: str
    batch_size: int
    local_steps: int


@dataclass(frozen=True)
class Work:
    """What every task gets: the run (absolute data folder) and the trained weights.

    Attributes:
        run: The run's settings.
        weights: ``(dataset, safetensors bytes)`` of each trained model.
    """

    run: IGRun
    weights: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Victim:
    """One experiment's private batch and what its client shared."""

    cell: Cell
    experiment: int
    indices: tuple[int, ...]
    images: torch.Tensor
    labels: tuple[int, ...]
    observation: Observation | UpdateObservation
    attack_seed: int


def held_out(size: int, seed: int) -> np.ndarray:
    """The held-out 20% of the seeded 80/20 split of `size` images: the victims' pool."""
    return split_indices(size, seed)[1].numpy()


def make_victim(
    data: ImageDataset,
    run: IGRun,
    cell: Cell,
    experiment: int,
    device: torch.device,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Victim:
    """Experiment `experiment` of `cell`: B distinct held-out images, their model, what is shared.

    Args:
        state: The trained model's weights (cell weights "trained"), else None.
    """
    key = [run.seed, DATASETS.index(cell.dataset), cell.batch_size, experiment]
    index_seed, model_seed, client_seed, attack_seed = (
        int(s.generate_state(1)[0]) for s in np.random.SeedSequence(key).spawn(4)
    )
    pool = held_out(len(data), run.seed)
    if cell.batch_size > len(pool):
        raise ConfigError(
            f"batch size {cell.batch_size} is larger than the held-out part of {cell.dataset} "
            f"({len(pool)} images)"
        )
    chosen = np.random.default_rng(index_seed).choice(len(pool), cell.batch_size, replace=False)
    indices = tuple(int(pool[i]) for i in chosen)
    pairs = [data[i] for i in indices]
    images = torch.stack([image for image, _ in pairs])
    labels = tuple(int(label) for _, label in pairs)
    model = build_model(
        run.model,
        input_shape=data.shape,
        num_classes=data.num_classes,
        seed=model_seed,
        width=run.width,
    )
    if state is not None:
        model.load_state_dict(state, strict=True)
    model = model.to(device).train()
    x, y = images.to(device), torch.tensor(labels, device=device)
    if cell.local_steps == 1:
        observation: Observation | UpdateObservation = observe(model, x, y, batchnorm=run.batchnorm)
    else:
        observation = observe_update(
            model,
            x,
            y,
            local_lr=run.local_lr,
            local_steps=cell.local_steps,
            local_batch=local_batch(cell.batch_size),
            seed=client_seed,
            batchnorm=run.batchnorm,
        )
    return Victim(cell, experiment, indices, images, labels, observation, attack_seed)


def build_attack(run: IGRun) -> InvertingGradients:
    """The attack every cell runs: the paper's IG cut to `run.iterations` steps, labels inferred."""
    return InvertingGradients(
        IGConfig.paper(
            iterations=run.iterations,
            tv_scale=run.tv_scale,
            labels="infer",
            snapshot_every=run.iterations,
        )
    )


def result_row(
    victim: Victim,
    result: Reconstruction | None,
    seconds: float,
    run: IGRun,
    error: str | None = None,
) -> dict[str, Any]:
    """One line of results.jsonl.

    ``labels_exact``: the inferred label multiset equals the true one (what
    the attacker learns about the labels; for B = 1 the label).
    ``labels_matched``: after matching reconstructions to originals, every
    original's matched reconstruction carries its label.  A failed attack
    (`AttackNotApplicable`) has ``error`` set and null metrics.
    """
    cell = victim.cell
    row: dict[str, Any] = {
        "dataset": cell.dataset,
        "weights": cell.weights,
        "batch_size": cell.batch_size,
        "local_steps": cell.local_steps,
        "experiment": victim.experiment,
        "shared": "gradient" if cell.local_steps == 1 else "update",
        "local_batch": cell.batch_size if cell.local_steps == 1 else local_batch(cell.batch_size),
        "local_lr": None if cell.local_steps == 1 else run.local_lr,
        "image_indices": list(victim.indices),
        "true_labels": list(victim.labels),
    }
    if result is None:
        none = [None] * cell.batch_size
        return row | {
            "predicted_labels": None,
            "labels_exact": False,
            "labels_matched": False,
            "per_image_mse": none,
            "per_image_psnr": none,
            "per_image_ssim": none,
            "psnr": None,
            "ssim": None,
            "mse": None,
            "matching_loss": None,
            "converged": False,
            "iterations": 0,
            "seconds": round(seconds, 4),
            "error": error,
        }
    recovered = result.inputs.detach().cpu()
    order, per_image_mse = metrics.match_reconstructions(recovered, victim.images)
    matched = recovered[order]
    predicted = [int(result.labels[j]) for j in order]
    pairs = list(zip(matched, victim.images, strict=True))
    per_psnr = [metrics.psnr(r, o) for r, o in pairs]
    per_ssim = [metrics.ssim(r[None], o[None]) for r, o in pairs]
    return row | {
        "predicted_labels": predicted,
        "labels_exact": sorted(predicted) == sorted(victim.labels),
        "labels_matched": predicted == list(victim.labels),
        "per_image_mse": [finite_or_none(m) for m in per_image_mse],
        "per_image_psnr": [finite_or_none(v) for v in per_psnr],
        "per_image_ssim": [finite_or_none(v) for v in per_ssim],
        "psnr": finite_or_none(sum(per_psnr) / len(per_psnr)),
        "ssim": finite_or_none(sum(per_ssim) / len(per_ssim)),
        "mse": finite_or_none(sum(per_image_mse) / len(per_image_mse)),
        "matching_loss": finite_or_none(result.final_loss),
        "converged": result.converged,
        "iterations": result.steps,
        "seconds": round(seconds, 4),
        "error": None,
    }


def row_key(row: Mapping[str, Any]) -> tuple[str, str, int, int, int]:
    """A line's identity: dataset, weights, batch size, local steps, experiment."""
    return (
        str(row["dataset"]),
        str(row["weights"]),
        int(row["batch_size"]),
        int(row["local_steps"]),
        int(row["experiment"]),
    )


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read results.jsonl (a cut-off last line is dropped).

    Raises:
        DataError: A complete line is not a result line (the file was edited).
    """
    return read_results(path, key=row_key)


def plan(run: IGRun) -> list[Group]:
    """The groups: every cell's first chunk, then every cell's second, ...

    Within a chunk the costlier cells (more images, more local steps) come
    first, so that workers finish together.  The plan depends on the
    settings alone.
    """
    cells = sorted(run.cells, key=lambda c: c.batch_size * (1 + c.local_steps), reverse=True)
    return [
        Group(tuple((*cell, e) for e in part), (cell, tuple(part)))
        for part in chunked(range(run.experiments), run.chunk)
        for cell in cells
    ]


def image_passes(cell: Cell) -> int:
    """Images through the model in one evaluation of a cell's objective (one victim, one step).

    K = 1: the B images of the gradient; K > 1: K local steps of
    `local_batch(B)` images each (the unrolled client).  An attack step's
    cost is about proportional to it (`bench/ig_table_cost.py`).
    """
    if cell.local_steps == 1:
        return cell.batch_size
    return cell.local_steps * local_batch(cell.batch_size)


def estimated_seconds(run: IGRun, sizes: Mapping[str, int], cores: int = DEFAULT_CORES) -> float:
    """The run's wall time on `cores` workers, from `SECONDS_PER_IMAGE_PASS`: a plan's estimate.

    Sums every planned victim's steps times its cell's image passes, and the
    trained models' epochs over their 80% of `sizes` (images per dataset),
    at this machine's measured rates.  The attacks spread over the cores;
    training runs first, on one.
    """
    scale = (run.width / 16) ** 2
    attacks = sum(
        len(group.spec[1]) * run.iterations * image_passes(group.spec[0])
        * SECONDS_PER_IMAGE_PASS[group.spec[0].dataset] * scale
        for group in plan(run)
    )  # fmt: skip
    training = 0.0
    if "trained" in run.weights:
        training = sum(
            run.epochs(d) * int(0.8 * sizes[d]) * TRAIN_SECONDS_PER_IMAGE_EPOCH[d] * scale
            for d in run.datasets
        )
    return training + attacks / max(1, cores)


def run_reproduce_ig(run: IGRun, *, callback: ProgressCallback | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep; write the weights, results.jsonl, summary.json, strips, report.md.

    Returns:
        The summary, as written to summary.json.

    Raises:
        ConfigError: Bad settings, or a folder holding another run (before any work).
        DataError: A dataset's files are missing or corrupt.
    """
    started = time.perf_counter()
    device = resolve_device(run.device)
    data = {name: cached_dataset(name, run.data_dir) for name in run.datasets}
    for name, dataset in data.items():
        pool = len(held_out(len(dataset), run.seed))
        if max(run.batch_sizes) > pool:
            raise ConfigError(
                f"batch size {max(run.batch_sizes)} is larger than the held-out 20% of {name} "
                f"({pool} images)"
            )
    out = prepare_out(run.out)
    with FolderLock(out):
        _pin(out, run, {name: len(d) for name, d in data.items()})
        trained: dict[str, dict[str, Any]] = {}
        blobs: list[tuple[str, bytes]] = []
        if "trained" in run.weights:
            for name in run.datasets:
                path, trained[name] = prepare_trained(run, name, out, len(data[name]), callback)
                blobs.append((name, path.read_bytes()))
        store = ResultsStore(out / RESULTS, key=row_key)

        with make_executor(run.workers, run.ray) as executor:

            def summarise() -> dict[str, Any]:
                wall = time.perf_counter() - started
                return report.summarise(
                    store.rows, run, trained, **_context(run, device, wall, executor.name)
                )

            def on_row(row: dict[str, Any]) -> None:
                report.write_summary(out, summarise())

            def progress(done: int, total: int) -> None:
                if callback is not None:
                    callback("attacks", done, total)

            work = Work(
                dataclasses.replace(run, data_dir=absolute_data_dir(run.data_dir)), tuple(blobs)
            )
            try:
                run_sweep(store, plan(run), attack_group, work, executor, on_row=on_row,
                          progress=progress)  # fmt: skip
            except BaseException:
                report.write_summary(out, summarise())  # what was done, however it ends
                raise
            summary = summarise()
        report.write_summary(out, summary)
        report.write_report(out, summary)
    return summary


def weights_file(out: Path, dataset: str, model: str) -> Path:
    """Where the trained model of `dataset` is kept: ``OUT/<dataset>-<model>.safetensors``."""
    return out / f"{dataset}-{model}.safetensors"


def prepare_trained(
    run: IGRun, dataset: str, out: Path, size: int, callback: ProgressCallback | None
) -> tuple[Path, dict[str, Any]]:
    """Train the model of `dataset` once; on a rerun, check and reuse the file.

    Returns:
        The weights file and what the report says of it (test accuracy, split, ...).

    Raises:
        ConfigError: The file there was trained with other settings.
    """
    path = weights_file(out, dataset, run.model)
    wanted = {
        "model": run.model,
        "width": run.width,
        "dataset": dataset,
        "dataset_size": size,
        "epochs": run.epochs(dataset),
        "seed": run.seed,
        "limit": run.train_limit,
    }
    if path.exists():
        metadata = read_metadata(path)
        held = {key: metadata.get(key) for key in wanted}
        if held != wanted:
            changed = [
                f"{k} {held[k]!r}, not {wanted[k]!r}" for k in wanted if held[k] != wanted[k]
            ]
            raise ConfigError(
                f"{path} was trained with other settings ({'; '.join(changed)}); "
                "delete it or use another --out"
            )
        fresh = False
    else:

        def report_steps(stage: str, done: float, total: int) -> None:
            if callback is not None and stage == "train":
                callback(f"train {dataset}", done, total)

        result = run_train(
            TrainRun(
                model=run.model,
                dataset=dataset,
                out=str(path),
                epochs=run.epochs(dataset),
                data_dir=run.data_dir,
                width=run.width,
                seed=run.seed,
                device=run.device,
                limit=run.train_limit,
                command=run.command,
            ),
            callback=report_steps,
        )
        metadata, fresh = result.metadata, True
    info = {
        "file": path.name,
        "test_accuracy": metadata["test_accuracy"],
        "test_correct": metadata["test_correct"],
        "test_images": metadata["test_images"],
        "train_images": metadata["train_images"],
        "epochs": metadata["epochs"],
        "steps": metadata["steps"],
        "optimizer": metadata["optimizer"],
        "lr": metadata["lr"],
        "split": metadata["split"],
        "train_seconds": metadata["seconds"],
        "trained_by_this_run": fresh,
    }
    return path, info


def _state(work: Work, dataset: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    blob = dict(work.weights).get(dataset)
    if blob is None:
        raise RuntimeError(f"no trained weights for {dataset} in the run's context")
    return load(blob)


def attack_group(work: Work, spec: tuple[Cell, tuple[int, ...]], emit: Emit) -> None:
    """The sweep task: one cell's chunk of experiments, attacked together.

    The victims of a chunk share the cell's setting, so they run as one
    stacked computation (`attack_victims`); a row's seconds are the chunk's
    time shared equally.  A victim no attack applies to (an all-zero
    update) would stop the stacked run, so then each is attacked alone.
    """
    cell, experiments = spec
    run = work.run
    device = resolve_device(run.device)
    data = cached_dataset(cell.dataset, run.data_dir)
    state = _state(work, cell.dataset) if cell.weights == "trained" else None
    attack = build_attack(run)
    victims = [make_victim(data, run, cell, e, device, state) for e in experiments]
    start = time.perf_counter()
    try:
        outcomes: list[tuple[Reconstruction | None, str | None, float]] = []
        results = attack_victims(
            attack, [v.observation for v in victims], seeds=[v.attack_seed for v in victims]
        )
        share = (time.perf_counter() - start) / len(victims)
        outcomes = [(result, None, share) for result in results]
    except AttackNotApplicable:
        outcomes = []
        for victim in victims:
            alone = time.perf_counter()
            try:
                result: Reconstruction | None = attack(victim.observation, seed=victim.attack_seed)
                error = None
            except AttackNotApplicable as failure:
                result, error = None, str(failure)
            outcomes.append((result, error, time.perf_counter() - alone))
    for victim, (result, error, seconds) in zip(victims, outcomes, strict=True):
        row = result_row(victim, result, seconds, run, error)
        files = None
        if victim.experiment == report.STRIP_EXPERIMENT and result is not None:
            files = {report.strip_name(cell): report.strip_frames(victim.images, result, row)}
        emit(row, files)


def _pin(out: Path, run: IGRun, sizes: Mapping[str, int]) -> None:
    """run.json: the pinned settings, and each dataset's size as first seen."""
    params = {
        "paper": "ig",
        "seed": run.seed,
        "model": run.model,
        "width": run.width,
        "iterations": run.iterations,
        "tv_scale": run.tv_scale,
        "local_lr": run.local_lr,
        "batchnorm": run.batchnorm,
        "train_epochs": run.train_epochs,
        "train_limit": run.train_limit,
        "dataset_sizes": dict(sizes),
        "seeding": SEEDING,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": run.command,
        "gradleak": gradleak.__version__,
        "torch": torch.__version__,
    }
    stored = pin_run(out, params, pinned=PINNED)
    known = dict(stored.get("dataset_sizes") or {})
    for name, size in sizes.items():
        if name in known and known[name] != size:
            raise ConfigError(
                f"{out} holds a run on {known[name]:,} {name} images, this data folder has "
                f"{size:,}: use another --out, or the data of the first run"
            )
    if any(name not in known for name in sizes):
        write_json(out / RUN, {**stored, "dataset_sizes": {**known, **sizes}})


def _context(run: IGRun, device: torch.device, wall: float, executor: str) -> dict[str, Any]:
    return {
        "executor": executor,
        "model": run.model,
        "width": run.width,
        "iterations": run.iterations,
        "paper_iterations": PAPER_ITERATIONS,
        "tv_scale": run.tv_scale,
        "local_lr": run.local_lr,
        "batchnorm": run.batchnorm,
        "train_epochs": run.train_epochs,
        "train_limit": run.train_limit,
        "device": str(device),
        "seed": run.seed,
        "chunk": run.chunk,
        "seeding": SEEDING,
        "command": run.command,
        "wall_seconds": round(wall, 3),
        "torch": torch.__version__,
        "gradleak": gradleak.__version__,
    }
