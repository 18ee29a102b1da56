"""`gradleak defend`: which defense, at what strength, at what cost to the model.

For every defense and strength, N experiments attack the defended gradient
with DLG and iDLG (attack success), and one training run measures the test
accuracy of the same LeNet trained with that defense (`defend_train`).

Victims and what the attacker sees of them: `defend_protocol`.

Files (under ``out``): results.jsonl (one line per defense, strength,
experiment and method, appended as attacks finish), accuracy.jsonl (one line
per defense and strength), run.json, summary.json, defense.png, report.md.
Rerunning the same command resumes: nothing written is recomputed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import gradleak
from gradleak.attacks import AttackConfig, build_attack
from gradleak.attacks.engine import attack_batch
from gradleak.data import ImageDataset, load_dataset
from gradleak.defenses import ALL, DEFENSES, build_defense, epsilon, get_defense, parse_strengths
from gradleak.errors import ConfigError
from gradleak.experiments.common import finite_or_none, resolve_device, use_cpu_threads
from gradleak.experiments.defend import plot as defend_plot
from gradleak.experiments.defend import report
from gradleak.experiments.defend import train as training
from gradleak.experiments.defend.protocol import (
    SEEDING,
    Config,
    Experiment,
    attacker_view,
    examples_mixed,
    make_experiment,
    result_row,
)
from gradleak.experiments.defend.store import Store

log = logging.getLogger(__name__)

DATASETS = ("mnist", "cifar100")
METHODS = ("dlg", "idlg")
EXAMPLE_EXPERIMENT = 0  # the experiment whose reconstructions examples.png shows

# callback(stage, done, total): stage "attacks" counts attacks, "training" runs.
ProgressCallback = Callable[[str, float, int], None]


@dataclass(frozen=True)
class DefendRun:
    """One `gradleak defend` invocation.

    Attributes:
        dataset: "mnist" or "cifar100".
        data_dir: Folder with the dataset's files (None: the default).
        defenses: Defense names, in order ("none" is always added first).
        strengths: Strengths for a single defense; None: its default sweep.
        experiments: Victims per defense and strength.
        iterations: L-BFGS steps per attack.
        improved: Attack with gradleak's improved mode instead of the papers'.
        seed: Fixes every random choice of the run.
        delta: The delta DP-SGD's epsilon is reported for.
        out: Output folder.
        chunk: Victims attacked at once.
        device: "auto", "cpu" or "cuda".
        train_examples: Cap on the training part (None: all of it).
        command: The command line, quoted in the report.
    """

    dataset: str = "mnist"
    data_dir: str | None = None
    defenses: tuple[str, ...] = ALL
    strengths: tuple[float, ...] | None = None
    experiments: int = 8
    iterations: int = 50
    improved: bool = False
    seed: int = 0
    delta: float = 1e-5
    out: str = "runs/defend"
    chunk: int = 64
    device: str = "auto"
    train_examples: int | None = None
    command: str = ""

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"unknown dataset '{self.dataset}': choose one of mnist, cifar100")
        for name in self.defenses:
            get_defense(name)
        if self.strengths is not None:
            if len(self.defenses) != 1:
                raise ConfigError("--strengths applies to one defense; it cannot go with all")
            for value in self.strengths:
                get_defense(self.defenses[0]).check(value)
        if self.experiments < 1 or self.iterations < 1 or self.chunk < 1:
            raise ConfigError("--experiments, --iterations and --chunk must be 1 or more")
        if self.seed < 0:
            raise ConfigError(f"--seed must be 0 or more, got {self.seed}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"--delta must be between 0 and 1, got {self.delta:g}")

    def configs(self) -> list[Config]:
        """Every (defense, strength) of the run, the undefended baseline first."""
        configs: list[Config] = [("none", None)]
        for name in self.defenses:
            spec = get_defense(name)
            if spec.name == "none":
                continue
            sweep = self.strengths if self.strengths is not None else spec.sweep
            configs += (
                [(spec.name, spec.check(s)) for s in sweep] if spec.knob else [(spec.name, None)]
            )
        return configs


def plan(defense: str, strengths: str | None) -> tuple[tuple[str, ...], tuple[float, ...] | None]:
    """Turn ``--defense`` and ``--strengths`` into `DefendRun` fields."""
    if defense.strip().lower() == "all":
        if strengths is not None:
            raise ConfigError("--strengths applies to one defense; it cannot go with all")
        return ALL, None
    spec = get_defense(defense)
    if strengths is None:
        return (spec.name,), None
    if not spec.knob:
        raise ConfigError(f"defense '{spec.name}' takes no strength; drop --strengths")
    return (spec.name,), parse_strengths(strengths, spec.name)


def run_defend(run: DefendRun, *, callback: ProgressCallback | None = None) -> dict[str, Any]:
    """Run (or resume) the audit and write its files; returns the summary."""
    started = time.perf_counter()
    device = resolve_device(run.device)
    use_cpu_threads(device)
    data = load_dataset(run.dataset, data_dir=run.data_dir, download=None)
    store = Store(Path(run.out))
    store.pin(_pinned(run, len(data)))
    configs = run.configs()
    _run_attacks(run, data, configs, store, device, callback)
    costs = _run_training(run, data, configs, store, device, callback)
    summary = report.summarise(
        store.rows(),
        costs,
        configs,
        experiments=run.experiments,
        context=_context(run, data, device, time.perf_counter() - started),
    )
    report.write_all(Path(run.out), summary)
    return summary


def _run_attacks(
    run: DefendRun,
    data: ImageDataset,
    configs: list[Config],
    store: Store,
    device: torch.device,
    callback: ProgressCallback | None,
) -> None:
    done = store.done()
    total = len(configs) * run.experiments * len(METHODS)
    pending = [
        (c, e)
        for e in range(run.experiments)
        for c in configs
        if any((*c, e, m) not in done for m in METHODS)
    ]
    finished = total - len(pending) * len(METHODS)
    if callback is not None:
        callback("attacks", finished, total)
    config = AttackConfig(iterations=run.iterations, improved=run.improved)
    attacks = {m: build_attack(m, config) for m in METHODS}
    most = max(examples_mixed(c) for c in configs)
    experiments: dict[int, Experiment] = {}
    for start in range(0, len(pending), run.chunk):
        chunk = pending[start : start + run.chunk]
        for _, e in chunk:
            if e not in experiments:
                experiments[e] = make_experiment(data, run.seed, e, most, device)
        views = [attacker_view(experiments[e], c) for c, e in chunk]
        for method in METHODS:
            todo = [i for i, (c, e) in enumerate(chunk) if (*c, e, method) not in done]
            if not todo:
                continue
            clock = time.perf_counter()
            results = attack_batch(
                attacks[method],
                [views[i][0] for i in todo],
                [experiments[chunk[i][1]].seeds[method] for i in todo],
            )
            share = (time.perf_counter() - clock) / len(todo)
            rows = [
                result_row(chunk[i][0], experiments[chunk[i][1]], views[i][1], method, r, share)
                for i, r in zip(todo, results, strict=True)
            ]
            for i, r in zip(todo, results, strict=True):
                c, e = chunk[i]
                if e == EXAMPLE_EXPERIMENT:  # before its line: a kill in between redoes both
                    label = c[0] if c[1] is None else f"{c[0]} {c[1]:g}"
                    defend_plot.save_example(
                        store.out, label, method, r.inputs[0].cpu(), experiments[e].images[0].cpu()
                    )
            store.append(rows)
            done.update((r["defense"], r["strength"], r["experiment"], method) for r in rows)
            finished += len(rows)
            if callback is not None:
                callback("attacks", finished, total)
        log.info("%d of %d attacks done", finished, total)


def _run_training(
    run: DefendRun,
    data: ImageDataset,
    configs: list[Config],
    store: Store,
    device: torch.device,
    callback: ProgressCallback | None,
) -> dict[Config, dict[str, Any]]:
    costs = store.costs()
    todo = [c for c in configs if c not in costs]
    if callback is not None:
        callback("training", len(configs) - len(todo), len(configs))
    if todo:
        split = training.split_data(data, run.seed, limit=run.train_examples)
    for number, config in enumerate(todo):
        base = len(configs) - len(todo) + number

        def progress(steps: int, total: int, base: int = base) -> None:
            if callback is not None:
                callback("training", base + steps / total, len(configs))

        defense = build_defense(*config, seed=run.seed + 1)  # its own noise, not the attacks'
        cost = training.train_with_defense(
            split,
            defense,
            dataset=run.dataset,
            num_classes=data.num_classes,
            seed=run.seed,
            device=device,
            progress=progress,
        )
        costs[config] = store.append_cost(config, cost)
    for (name, strength), cost in costs.items():
        if name == "dpsgd" and strength is not None:
            cost["epsilon"] = finite_or_none(
                epsilon(
                    strength, sample_rate=cost["sample_rate"], steps=cost["steps"], delta=run.delta
                )
            )
    return costs


def _pinned(run: DefendRun, size: int) -> dict[str, Any]:
    return {
        "paper": "dlg-defenses",
        "dataset": run.dataset,
        "mode": "improved" if run.improved else "faithful",
        "iterations": run.iterations,
        "train_examples": run.train_examples,
        "seed": run.seed,
        "model": "lenet",
        "dataset_size": size,
        "seeding": SEEDING,
        "training": training.TRAINING,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": run.command,
    }


def _context(
    run: DefendRun, data: ImageDataset, device: torch.device, wall: float
) -> dict[str, Any]:
    return {
        "dataset": run.dataset,
        "experiments": run.experiments,
        "iterations": run.iterations,
        "mode": "improved" if run.improved else "faithful",
        "seed": run.seed,
        "delta": run.delta,
        "device": str(device),
        "command": run.command,
        "wall_seconds": round(wall, 1),
        "training": training.TRAINING,
        "chance_accuracy": 1 / data.num_classes,
        "gradleak": gradleak.__version__,
        "torch": torch.__version__,
        "defenses": {n: DEFENSES[n].knob for n in dict.fromkeys(c[0] for c in run.configs())},
    }


__all__: Sequence[str] = ("DATASETS", "METHODS", "DefendRun", "plan", "run_defend")
