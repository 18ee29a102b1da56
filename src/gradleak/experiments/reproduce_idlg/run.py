"""`gradleak reproduce idlg`: iDLG's Table 1 and Figure 1, resumable.

Experiments (`reproduce_protocol`) run in groups of victims: every attack is
appended to results.jsonl as soon as it ends, and a rerun of the same
command skips what is there, so an interrupted run of 1000 experiments picks
up where it stopped, losing only the attacks in flight.  Two engines attack a
group: "sequential" (one victim after another, the reference) and "batched"
(many victims at once).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import gradleak
from gradleak.attacks import AttackConfig, GradientInversion, build_attack
from gradleak.data import load_dataset
from gradleak.errors import ConfigError
from gradleak.experiments.common import resolve_device, use_cpu_threads
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
from gradleak.sweep.store import (
    RESULTS,
    append_results,
    pin_run,
    read_results,
)
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
        chunk: Victims attacked at once; every result is saved as it ends.
        device: "auto", "cpu" or "cuda".
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
    chunk: int = 32
    device: str = "auto"
    command: str = ""

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
    device = resolve_device(run.device)
    # LeNet-sized work, batched or not, is too small to split across threads: on
    # the 2-core machine two threads ran the batched engine many times slower.
    use_cpu_threads(device)
    summaries = [_reproduce_dataset(run, name, device, callback) for name in run.datasets]
    if run.nested:
        report.write_combined_report(Path(run.out), summaries)
    return summaries


def _reproduce_dataset(
    run: ReproduceRun, dataset: str, device: torch.device, callback: ProgressCallback | None
) -> dict[str, Any]:
    started = time.perf_counter()
    data = load_dataset(dataset, data_dir=run.data_dir, download=None)
    out = run.folder(dataset)
    pin_run(out, _pinned(run, dataset, len(data)))
    results_path = out / RESULTS
    rows = read_results(results_path)
    done = {(r["experiment"], r["method"]) for r in rows}
    total = run.experiments
    finished = sum(1 for e, _ in done if e < total)  # attacks, two per experiment

    def progress(count: int = 0) -> None:
        nonlocal finished
        finished += count
        if callback is not None:
            callback(dataset, finished / len(METHODS), total)

    def summarise() -> dict[str, Any]:
        context = _context(run, dataset, device, time.perf_counter() - started)
        return report.summarise(rows, experiments=total, **context)

    attacks = {m: build_attack(m, AttackConfig(improved=run.mode == "improved")) for m in METHODS}
    pending = [e for e in range(total) if any((e, m) not in done for m in METHODS)]
    log.info("%s: %d of %d experiments to run", dataset, len(pending), total)
    progress()

    def save(method: str, victim: Victim, result: Reconstruction, seconds: float) -> None:
        # Each result is saved as it ends.  Frames before the line: a kill in
        # between reruns the attack, which rewrites them.
        if victim.experiment == report.STRIP_EXPERIMENT:
            report.save_strip_frames(out, method, victim.image, result)
        row = result_row(victim, method, dataset, result, seconds, run.engine, device)
        append_results(results_path, [row])
        rows.append(row)
        done.add((victim.experiment, method))
        progress(1)
        if len(rows) % run.chunk == 0:  # the summary, too, keeps up as the run goes
            report.write_summary(out, summarise())

    # Improved attacks take every victim of a group at once; faithful ones
    # take `chunk` at a time from a larger group, starting the next victim as
    # soon as one finishes, so that the batch stays full (a group's last,
    # slowest victims run almost alone).
    wanted = run.chunk if run.mode == "improved" else max(run.chunk, FAITHFUL_GROUP)
    group = _fitting_chunk(wanted, data.shape, data.num_classes)
    if group < run.chunk:
        log.info("%s: %d victims at a time (memory; --chunk %d)", dataset, group, run.chunk)
    for start in range(0, len(pending), group):
        victims = [
            make_victim(data, dataset, run.seed, e, device) for e in pending[start : start + group]
        ]
        for method in METHODS:
            todo = [v for v in victims if (v.experiment, method) not in done]
            _attack(attacks[method], todo, run.engine, run.chunk, functools.partial(save, method))
        report.write_summary(out, summarise())
        log.info("%s: %d attacks done", dataset, len(rows))
    summary = summarise()
    report.write_summary(out, summary)
    report.write_dataset_report(out, summary)
    return summary


def _attack(
    attack: GradientInversion,
    victims: Sequence[Victim],
    engine: str,
    width: int,
    save: Callable[[Victim, Reconstruction, float], None],
) -> None:
    """Attack every victim with its own seed; `save` gets each result as it ends.

    With the sequential engine a result's seconds are its own attack's; with
    the batched one, the wall time since the previous result of the same
    batch (their sum is the batch's wall time: the victims share it).
    """
    if not victims:
        return
    seeds = [v.seeds.attacks[attack.name] for v in victims]
    if engine == "sequential":
        for victim, seed in zip(victims, seeds, strict=True):
            start = time.perf_counter()
            result = attack(victim.observation, seed=seed)
            save(victim, result, time.perf_counter() - start)
        return
    # Imported here so that the sequential path works without the batched engine.
    from gradleak.attacks.engine import attack_batch

    last = time.perf_counter()

    def on_result(index: int, result: Reconstruction) -> None:
        nonlocal last
        now = time.perf_counter()
        save(victims[index], result, now - last)
        last = now

    attack_batch(
        attack,
        [v.observation for v in victims],
        seeds,
        snapshots=[v.experiment == report.STRIP_EXPERIMENT for v in victims],
        on_result=on_result,
        width=width,
    )


# Victims a faithful run loads at once (memory allowing), of which it attacks
# `chunk` at a time.
FAITHFUL_GROUP = 512

# Memory the batched engine may use for one chunk; a victim costs about 20
# float64 copies of the model's parameters (its weights, the shared gradient,
# the replayed gradient and what differentiating it again keeps).
CHUNK_MEMORY = 6 * 2**30


def _fitting_chunk(chunk: int, input_shape: tuple[int, ...], num_classes: int) -> int:
    """At most `chunk` victims, and no more than fit in CHUNK_MEMORY.

    LeNet's last layer dominates for many classes: LFW's 5,749 people make
    each victim about 0.7 GB, and a chunk of 32 ran out of 24 GB.
    """
    probe = build_model(MODEL, input_shape=input_shape, num_classes=num_classes, seed=0)
    per_victim = 20 * 8 * sum(p.numel() for p in probe.parameters())
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


def _context(run: ReproduceRun, dataset: str, device: torch.device, wall: float) -> dict[str, Any]:
    """The summary's description of this invocation."""
    return {
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
