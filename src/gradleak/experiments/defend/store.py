"""The files that make `gradleak defend` resumable.

results.jsonl: one line per (defense, strength, experiment, method) attack;
accuracy.jsonl: one line per (defense, strength) training run; run.json pins
what the lines mean.  Lines are only appended, flushed and fsynced; a last
line cut off by a kill is dropped on the next start and its work redone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gradleak.errors import ConfigError
from gradleak.sweep.store import append_results, pin_run, read_results

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
ACCURACY = "accuracy.jsonl"
# What else a rerun must share with the first start (attack budget, training data).
PINNED_HERE = ("iterations", "train_examples")

Config = tuple[str, float | None]
AttackKey = tuple[str, float | None, int, str]


class Store:
    """results.jsonl and accuracy.jsonl of one run folder."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.results = out / RESULTS
        self.accuracy = out / ACCURACY

    def pin(self, params: Mapping[str, Any]) -> None:
        """Create the folder and run.json, or check a rerun matches it.

        Besides `reproduce_store.PINNED`, the keys in `PINNED_HERE` must match.
        """
        stored = pin_run(self.out, params)
        changed = [k for k in PINNED_HERE if stored.get(k) != params.get(k)]
        if changed:
            what = ", ".join(f"{k} {stored.get(k)!r} -> {params.get(k)!r}" for k in changed)
            raise ConfigError(
                f"{self.out} holds a run with other settings ({what}); "
                "use another --out, or the same settings to resume it"
            )

    def rows(self) -> list[dict[str, Any]]:
        """Every attack line, the first of any duplicate key kept."""
        return read_results(self.results, key=_attack_key)

    def done(self) -> set[AttackKey]:
        """Keys of the attacks already written."""
        return {_attack_key(row) for row in read_results(self.results, key=_attack_key)}

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        append_results(self.results, rows)

    def costs(self) -> dict[Config, dict[str, Any]]:
        """The training result of every (defense, strength) written so far."""
        return {_config_key(r): r for r in read_results(self.accuracy, key=_config_key)}

    def append_cost(self, config: Config, cost: Any) -> dict[str, Any]:
        """Write one training result; returns its line as a dict."""
        row = {"defense": config[0], "strength": config[1], **dataclasses.asdict(cost)}
        row["seconds"] = round(row["seconds"], 3)
        append_results(self.accuracy, [row])
        return row


def _attack_key(row: Mapping[str, Any]) -> AttackKey:
    return (row["defense"], row["strength"], int(row["experiment"]), row["method"])


def _config_key(row: Mapping[str, Any]) -> Config:
    return (row["defense"], row["strength"])
