"""Small pieces every experiment needs: devices, seeds, JSON that stays valid."""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from gradleak.data import FULL_SIZES, ImageDataset
from gradleak.errors import ConfigError
from gradleak.sweep.store import RUN, write_json

__all__ = [
    "data_source",
    "cached_dataset",
    "derive_seeds",
    "finite_or_none",
    "resolve_device",
    "source_text",
    "use_cpu_threads",
    "write_json",
]

DEVICES = ("auto", "cpu", "cuda")
DATASET_NAMES = {
    "mnist": "MNIST",
    "cifar100": "CIFAR-100",
    "cifar10": "CIFAR-10",
    "lfw": "LFW",
    "svhn": "SVHN",
}


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
    project's 2-core machine one thread ran an evaluation about 3x faster
    than two (bench/threads.py, BENCHMARKS.md).
    """
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def absolute_data_dir(data_dir: str | None) -> str:
    """The data folder as an absolute path, resolved here, on the driver.

    Sweep tasks may run on other machines (Ray), whose environment has
    neither this process's working directory nor its $GRADLEAK_DATA.
    """
    from gradleak.data.locate import resolve_data_dir

    return str(resolve_data_dir(data_dir).resolve())


def cached_dataset(name: str, data_dir: str | None) -> ImageDataset:
    """Dataset `name`, read once per process (the driver and every worker).

    The folder is resolved first, so the driver's read (with the user's
    relative or default folder) and its tasks' reads (with the absolute path
    they are sent) share one entry when the sweep runs in this process.
    """
    return _read_dataset(name, absolute_data_dir(data_dir))


@functools.lru_cache(maxsize=4)
def _read_dataset(name: str, data_dir: str) -> ImageDataset:
    from gradleak.data import load_dataset

    return load_dataset(name, data_dir=data_dir, download=None)


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


def source_text(dataset: str, size: int | None) -> str:
    """How many images the victims were drawn from, and whether that is the whole split.

    Every experiment reads the test split (LFW has none: all its images). Example:
    "victims drawn from 916 of CIFAR-100's 10,000 test images (a partial copy)".
    """
    name = DATASET_NAMES.get(dataset, dataset)
    split = None if dataset == "lfw" else "test"
    what = "images" if split is None else f"{split} images"
    full = FULL_SIZES.get(dataset)
    if size is None:
        return f"victims drawn from {name}'s {what} (how many: not recorded)"
    if full is None:
        return f"victims drawn from the {size:,} {what} of {name}"
    if size < full:
        return f"victims drawn from {size:,} of {name}'s {full:,} {what} (a partial copy)"
    whole = "set" if split is None else f"{split} split"
    return f"victims drawn from all {size:,} of {name}'s {what} (the full {whole})"


def data_source(folder: Path, dataset: str) -> str:
    """`source_text` for the run in `folder`, from the dataset size its run.json pins."""
    try:
        pinned = json.loads((folder / RUN).read_text())
    except (OSError, ValueError):
        pinned = {}
    size = pinned.get("dataset_size") if pinned.get("dataset", dataset) == dataset else None
    return source_text(dataset, size)
