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

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import gradleak
from gradleak.attacks import AttackConfig, build_attack
from gradleak.attacks.engine import attack_batch
from gradleak.data import ImageDataset
from gradleak.defenses import ALL, DEFENSES, build_defense, epsilon, get_defense, parse_strengths
from gradleak.errors import ConfigError
from gradleak.experiments.common import (
    absolute_data_dir,
    cached_dataset,
    finite_or_none,
    resolve_device,
)
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
from gradleak.outdir import prepare_out
from gradleak.sweep.executors import make_executor
from gradleak.sweep.runner import Emit, Group, chunked, run_sweep
from gradleak.sweep.store import FolderLock

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
        workers: Worker processes (None: one per CPU core; 1: this process).
        ray: Run the work as Ray tasks: "local", "auto" or "HOST:PORT".
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
    workers: int | None = None
    ray: str | None = None

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
    data = cached_dataset(run.dataset, run.data_dir)
    out = prepare_out(run.out)
    store = Store(out)
    configs = run.configs()
    with FolderLock(out), make_executor(run.workers, run.ray) as executor:
        store.pin(_pinned(run, len(data)))
        attacks, training = store.attacks(), store.training()

        def stage(name: str) -> Callable[[int, int], None]:
            def progress(done: int, total: int) -> None:
                if callback is not None:
                    callback(name, done, total)

            return progress

        located = dataclasses.replace(run, data_dir=absolute_data_dir(run.data_dir))
        work = _Work(located, examples=max(examples_mixed(c) for c in configs))
        try:
            run_sweep(attacks, attack_plan(run, configs), attack_group, work, executor,
                      progress=stage("attacks"))  # fmt: skip
            groups = [Group((c,), c) for c in configs]
            run_sweep(training, groups, train_group, work, executor, progress=stage("training"))
        finally:
            costs = _costs(run, training.rows)
            summary = report.summarise(
                attacks.rows,
                costs,
                configs,
                experiments=run.experiments,
                context=_context(run, data, device, time.perf_counter() - started, executor),
            )
            report.write_all(out, summary)
    return summary


@dataclass(frozen=True)
class _Work:
    """What a worker needs (picklable): the run and the most examples any defense mixes."""

    run: DefendRun
    examples: int


def attack_plan(run: DefendRun, configs: list[Config]) -> list[Group]:
    """Per method, `--chunk` (defense, strength, experiment) victims at a time."""
    victims = [(c, e) for e in range(run.experiments) for c in configs]
    return [
        Group(tuple((*c, e, method) for c, e in part), (method, tuple(part)))
        for method in METHODS
        for part in chunked(victims, run.chunk)
    ]


def attack_group(work: _Work, spec: tuple[str, tuple[tuple[Config, int], ...]], emit: Emit) -> None:
    """The sweep task: attack one method on a group of defended victims.

    A row's seconds are the group's attack time shared evenly.
    """
    method, victims = spec
    run = work.run
    device = resolve_device(run.device)
    data = cached_dataset(run.dataset, run.data_dir)
    experiments: dict[int, Experiment] = {}
    for _, e in victims:
        if e not in experiments:
            experiments[e] = make_experiment(data, run.seed, e, work.examples, device)
    views = [attacker_view(experiments[e], c) for c, e in victims]
    attack = build_attack(method, AttackConfig(iterations=run.iterations, improved=run.improved))
    clock = time.perf_counter()
    results = attack_batch(
        attack, [view for view, _ in views], [experiments[e].seeds[method] for _, e in victims]
    )
    share = (time.perf_counter() - clock) / len(victims)
    for (c, e), (_, mixed), result in zip(victims, views, results, strict=True):
        files = None
        if e == EXAMPLE_EXPERIMENT:  # sent with its line: written before it
            label = c[0] if c[1] is None else f"{c[0]} {c[1]:g}"
            name, data_bytes = defend_plot.example_file(
                label, method, result.inputs[0].cpu(), experiments[e].images[0].cpu()
            )
            files = {name: data_bytes}
        emit(result_row(c, experiments[e], mixed, method, result, share), files)


def train_group(work: _Work, config: Config, emit: Emit) -> None:
    """The sweep task: train LeNet with one defense and measure its test accuracy."""
    run = work.run
    data = cached_dataset(run.dataset, run.data_dir)
    split = _split(run.dataset, run.data_dir, run.seed, run.train_examples)
    defense = build_defense(*config, seed=run.seed + 1)  # its own noise, not the attacks'
    cost = training.train_with_defense(
        split,
        defense,
        dataset=run.dataset,
        num_classes=data.num_classes,
        seed=run.seed,
        device=resolve_device(run.device),
    )
    row = {"defense": config[0], "strength": config[1], **dataclasses.asdict(cost)}
    row["seconds"] = round(row["seconds"], 3)
    emit(row, None)


@functools.lru_cache(maxsize=1)
def _split(dataset: str, data_dir: str | None, seed: int, limit: int | None) -> training.Split:
    return training.split_data(cached_dataset(dataset, data_dir), seed, limit=limit)


def _costs(run: DefendRun, rows: list[dict[str, Any]]) -> dict[Config, dict[str, Any]]:
    """The training result of every (defense, strength), with DP-SGD's epsilon."""
    costs = {(r["defense"], r["strength"]): dict(r) for r in rows}
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
    run: DefendRun, data: ImageDataset, device: torch.device, wall: float, executor: Any
) -> dict[str, Any]:
    return {
        "executor": executor.name,
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
