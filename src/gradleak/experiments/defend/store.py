"""The files that make `gradleak defend` resumable.

results.jsonl: one line per (defense, strength, experiment, method) attack;
accuracy.jsonl: one line per (defense, strength) training run; run.json pins
what the lines mean.  Both are `sweep.store.ResultsStore`s: lines are only
appended, flushed and fsynced, and a last line cut off by a kill is dropped
on the next start and its work redone.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

from gradleak.sweep.store import PINNED, ResultsStore, pin_run

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
        self.out = Path(out)

    def pin(self, params: Mapping[str, Any]) -> None:
        """Create the folder and run.json, or check a rerun matches it.

        Besides `sweep.store.PINNED`, the keys in `PINNED_HERE` must match.
        """
        pin_run(self.out, params, (*PINNED, *PINNED_HERE))

    def attacks(self) -> ResultsStore:
        """The attack lines, keyed by defense, strength, experiment and method."""
        return ResultsStore(self.out / RESULTS, key=attack_key)

    def training(self) -> ResultsStore:
        """The training lines, keyed by defense and strength."""
        return ResultsStore(self.out / ACCURACY, key=config_key)


def attack_key(row: Mapping[str, Any]) -> Hashable:
    return (row["defense"], row["strength"], int(row["experiment"]), row["method"])


def config_key(row: Mapping[str, Any]) -> Hashable:
    return (row["defense"], row["strength"])
