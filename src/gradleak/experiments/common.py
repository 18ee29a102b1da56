"""Small pieces every experiment needs: devices, seeds, JSON that stays valid."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from gradleak.errors import ConfigError
from gradleak.sweep.store import write_json

__all__ = ["derive_seeds", "finite_or_none", "resolve_device", "use_cpu_threads", "write_json"]

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is a user error."""
    if name not in DEVICES:
        raise ConfigError(f"unknown device '{name}': choose one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but no CUDA GPU is visible; use --device cpu"
        )
    return torch.device(name)


def use_cpu_threads(device: torch.device) -> None:
    """One intra-op thread on the CPU unless the user chose (OMP_NUM_THREADS).

    A single attack is a long chain of small tensor ops (a LeNet on one
    image); splitting each across threads costs more than it saves.  On this
    project's 2-core machine one thread ran an evaluation about 1.5x faster
    than two (bench/threads.py, BENCHMARKS.md).
    """
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def derive_seeds(seed: int, count: int) -> list[int]:
    """Independent seeds for the separate random choices of one experiment.

    Seeding the model init and the dummy init with the same number would make
    their random streams identical; SeedSequence keeps them independent while
    one user-facing seed still fixes everything.
    """
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(count)]


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity; a diverged metric is written as null."""
    return value if math.isfinite(value) else None
