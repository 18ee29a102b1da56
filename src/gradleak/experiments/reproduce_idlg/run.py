"""`gradleak reproduce idlg`: iDLG's Table 1 and Figure 1, resumable.

Experiments (protocol.py) run on the sweep runner in fixed groups of
`--chunk` victims, each attacked by both methods: every attack is appended
to results.jsonl as soon as it ends, and a rerun of the same command skips
what is there, so an interrupted run of 1000 experiments picks up where it
stopped, losing only the attacks in flight.  Groups run in this process, on worker processes
(`--workers`) or on Ray (`--ray`), with the same rows.  Two engines attack a
group: "sequential" (one victim after another, the reference) and
"batched" (many victims at once).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import gradleak
from gradleak.attacks import AttackConfig, build_attack
from gradleak.errors import ConfigError
from gradleak.experiments.common import absolute_data_dir, cached_dataset, resolve_device
from gradleak.experiments.reproduce_idlg import report
from gradleak.experiments.reproduce_idlg.protocol import (
    DATASETS,
    METHODS,
    MODEL,
    SEEDING,
    Victim,
    make_victim,
    result_row,
)
from gradleak.models import build_model
from gradleak.outdir import prepare_out
from gradleak.sweep.executors import make_executor
from gradleak.sweep.runner import Emit, Group, chunked, run_sweep
from gradleak.sweep.store import RESULTS, FolderLock, ResultsStore, pin_run
from gradleak.types import Reconstruction

__all__ = ["DATASETS", "ENGINES", "METHODS", "MODES", "ReproduceRun", "run_reproduce"]

log = logging.getLogger(__name__)

PAPERS = ("idlg",)
MODES = ("faithful", "improved")
ENGINES = ("batched", "sequential")

# callback(dataset, experiments done, experiments asked for); an experiment
# counts half when one of its two attacks is done.
ProgressCallback = Callable[[str, float, int], None]


@dataclass(frozen=True)
class ReproduceRun:
    """One `gradleak reproduce` invocation.

    Attributes:
        paper: Which paper to reproduce ("idlg").
        datasets: The datasets to run, in order.
        nested: Write each dataset into ``out/<dataset>/`` and a combined
            ``out/report.md`` (``--all-datasets``); otherwise into ``out``.
        data_dir: Folder with the datasets' files (None: the default).
        experiments: Experiments per dataset (the paper: 1000).
        mode: "faithful" (the paper's protocol) or "improved".
        engine: "batched" (many victims at once) or "sequential".
        seed: Fixes every random choice of the run.
        out: Output folder.
        chunk: Victims attacked at once (a group of the plan); every result
            is saved as it ends.
        device: "auto", "cpu" or "cuda".
        workers: Worker processes (None: one per CPU core; 1: this process).
        ray: Run the groups as Ray tasks: "local", "auto" or "HOST:PORT".
        command: The command line, quoted in the report.
    """

    paper: str = "idlg"
    datasets: tuple[str, ...] = ("mnist",)
    nested: bool = False
    data_dir: str | None = None
    experiments: int = 1000
    mode: str = "faithful"
    engine: str = "batched"
    seed: int = 0
    out: str = "runs/reproduce-idlg"
    chunk: int = 16
    device: str = "auto"
    command: str = ""
    workers: int | None = None
    ray: str | None = None

    def __post_init__(self) -> None:
        _choose("paper", self.paper, PAPERS)
        if not self.datasets:
            raise ConfigError("no dataset given: use --dataset NAME or --all-datasets")
        for name in self.datasets:
            _choose("dataset", name, DATASETS)
        _choose("mode", self.mode, MODES)
        _choose("engine", self.engine, ENGINES)
        if self.experiments < 1 or self.chunk < 1:
            raise ConfigError("--experiments and --chunk must be 1 or more")
        if self.seed < 0:
            raise ConfigError(f"--seed must be 0 or more, got {self.seed}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be 1 or more, got {self.workers}")

    def folder(self, dataset: str) -> Path:
        """Where `dataset`'s files go."""
        return Path(self.out) / dataset if self.nested else Path(self.out)


def run_reproduce(
    run: ReproduceRun, *, callback: ProgressCallback | None = None
) -> list[dict[str, Any]]:
    """Run (or resume) the reproduction and write its files.

    Returns:
        The summary of each dataset, as written to its summary.json.
    """
    resolve_device(run.device)  # bad input fails before anything is written
    for name in run.datasets:
        cached_dataset(name, run.data_dir)
    out = prepare_out(run.out)
    with FolderLock(out), make_executor(run.workers, run.ray) as executor:
        summaries = [_reproduce_dataset(run, name, executor, callback) for name in run.datasets]
        if run.nested:
            report.write_combined_report(Path(run.out), summaries)
    return summaries


@dataclass(frozen=True)
class Work:
    """What a worker needs to rebuild and attack a group of victims (picklable)."""

    dataset: str
    data_dir: str | None
    seed: int
    mode: str
    engine: str
    device: str


def plan(
    run: ReproduceRun, dataset: str, input_shape: tuple[int, ...], classes: int
) -> list[Group]:
    """The dataset's groups: consecutive experiments, `--chunk` at a time, both methods.

    A group's victims are built once and attacked by each method in turn (one
    batch per method), sharing their closed-form start where the methods'
    labels agree.  Groups depend on the run's settings only (see
    sweep.runner), capped by memory.
    """
    size = _fitting_chunk(run.chunk, input_shape, classes)
    groups = []
    for part in chunked(range(run.experiments), size):
        keys = tuple((e, method) for method in METHODS for e in part)
        groups.append(Group(keys, tuple(part)))
    return groups


def _reproduce_dataset(
    run: ReproduceRun, dataset: str, executor: Any, callback: ProgressCallback | None
) -> dict[str, Any]:
    started = time.perf_counter()
    data = cached_dataset(dataset, run.data_dir)
    out = run.folder(dataset)
    pin_run(out, _pinned(run, dataset, len(data)))
    store = ResultsStore(out / RESULTS, key=_row_key)
    total = run.experiments
    device = resolve_device(run.device)

    def summarise() -> dict[str, Any]:
        context = _context(run, dataset, device, time.perf_counter() - started, executor)
        return report.summarise(store.rows, experiments=total, **context)

    def on_row(row: dict[str, Any]) -> None:
        if len(store.rows) % run.chunk == 0:  # the summary keeps up as the run goes
            report.write_summary(out, summarise())

    def progress(done: int, items: int) -> None:
        if callback is not None:
            callback(dataset, done / len(METHODS), total)

    groups = plan(run, dataset, data.shape, data.num_classes)
    data_dir = absolute_data_dir(run.data_dir)
    work = Work(dataset, data_dir, run.seed, run.mode, run.engine, run.device)
    try:
        run_sweep(store, groups, attack_group, work, executor, on_row=on_row, progress=progress)
    except BaseException:
        report.write_summary(out, summarise())  # what was done, however the run ends
        raise
    summary = summarise()
    report.write_summary(out, summary)
    report.write_dataset_report(out, summary)
    return summary


def _row_key(row: Mapping[str, Any]) -> tuple[int, str]:
    return int(row["experiment"]), str(row["method"])


def attack_group(work: Work, spec: tuple[int, ...], emit: Emit) -> None:
    """The sweep task: rebuild the group's victims and attack them with both methods.

    The batched engine runs both methods as one batch (`attack_together`:
    the rows of one victim share each pass over its last layer, and one
    closed-form start); the sequential one runs each attack on its own.
    """
    data = cached_dataset(work.dataset, work.data_dir)
    device = resolve_device(work.device)
    victims = [make_victim(data, work.dataset, work.seed, e, device) for e in spec]
    attacks = [
        build_attack(method, AttackConfig(improved=work.mode == "improved")) for method in METHODS
    ]

    def save(victim: Victim, method: str, result: Reconstruction, seconds: float) -> None:
        files = None
        if victim.experiment == report.STRIP_EXPERIMENT:
            files = {f"strip-{method}.npz": report.strip_frames(victim.image, result)}
        row = result_row(victim, method, work.dataset, result, seconds, work.engine, device)
        emit(row, files)

    if work.engine == "sequential":
        for attack in attacks:
            for victim in victims:
                start = time.perf_counter()
                result = attack(victim.observation, seed=victim.seeds.attacks[attack.name])
                save(victim, attack.name, result, time.perf_counter() - start)
        return
    # Imported here so that the sequential path works without the batched engine.
    from gradleak.attacks.engine import attack_together

    last = time.perf_counter()

    def on_result(k: int, index: int, result: Reconstruction) -> None:
        # A result's seconds: the wall time since the previous result of the
        # same batch (their sum is the batch's wall time: the rows share it).
        nonlocal last
        now = time.perf_counter()
        save(victims[index], attacks[k].name, result, now - last)
        last = now

    attack_together(
        attacks,
        [v.observation for v in victims],
        [[v.seeds.attacks[a.name] for v in victims] for a in attacks],
        snapshots=[v.experiment == report.STRIP_EXPERIMENT for v in victims],
        on_result=on_result,
    )


# Memory one chunk may use: its victims' observations and the batched engine's state.
CHUNK_MEMORY = 6 * 2**30


def _fitting_chunk(chunk: int, input_shape: tuple[int, ...], num_classes: int) -> int:
    """At most `chunk` victims, and no more than fit in CHUNK_MEMORY.

    A victim holds its observation (the model and the shared gradient, float32)
    and, in the engine, L-BFGS's 100 curvature pairs over its variables (the
    input, and DLG's label logits) with a margin for the rest, in float64 at
    most.  The engine copies no large last layer (attacks/lowrank.py): an LFW
    victim is about 51 MB by this count (bench/memory.py measures the engine's
    part), where it was 0.7 GB and capped the chunk at 9.
    """
    probe = build_model(MODEL, input_shape=input_shape, num_classes=num_classes, seed=0)
    observation = 2 * 4 * sum(p.numel() for p in probe.parameters())
    variables = math.prod(input_shape) + num_classes
    per_victim = observation + 8 * (2 * 100 + 20) * variables
    return max(1, min(chunk, CHUNK_MEMORY // per_victim))


def _pinned(run: ReproduceRun, dataset: str, size: int) -> dict[str, Any]:
    """run.json: what the results mean, fixed at the first start."""
    return {
        "paper": run.paper,
        "dataset": dataset,
        "mode": run.mode,
        "seed": run.seed,
        "model": MODEL,
        "dataset_size": size,
        "seeding": SEEDING,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": run.command,
        "gradleak": gradleak.__version__,
        "torch": torch.__version__,
    }


def _context(
    run: ReproduceRun, dataset: str, device: torch.device, wall: float, executor: Any
) -> dict[str, Any]:
    """The summary's description of this invocation."""
    return {
        "executor": executor.name,
        "paper": run.paper,
        "dataset": dataset,
        "mode": run.mode,
        "engine": run.engine,
        "device": str(device),
        "seed": run.seed,
        "chunk": run.chunk,
        "command": run.command,
        "wall_seconds": round(wall, 3),
        "torch": torch.__version__,
        "gradleak": gradleak.__version__,
    }


def _choose(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {what} '{value}': choose one of {', '.join(choices)}")
