"""SVHN cropped digits (``test_32x32.mat`` / ``train_32x32.mat``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.io

from gradleak.data.dataset import ImageDataset, array_loader
from gradleak.data.locate import candidate_dirs, locate
from gradleak.errors import DataError

log = logging.getLogger(__name__)

_SIDE = 32
CLASS_NAMES = tuple(str(d) for d in range(10))


def file_name(split: str) -> str:
    """The .mat file name of ``split``."""
    return f"{split}_32x32.mat"


def find_file(data_dir: Path, split: str) -> Path | None:
    """First candidate location of the split's .mat file, or ``None``."""
    for folder in candidate_dirs(data_dir, "svhn", None):
        path = folder / file_name(split)
        if path.is_file():
            return path
    return None


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an SVHN .mat file.

    Returns:
        ``(images, labels)``: a uint8 ``(N, 3, 32, 32)`` view of the file's ``X`` array
        (not a copy: items are made contiguous one at a time) and int64 labels ``0..9``.

    Raises:
        DataError: If the file is unreadable, truncated or not in SVHN's layout.
    """
    try:
        mat = scipy.io.loadmat(path, variable_names=("X", "y"))
    except (
        OSError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        EOFError,
        MemoryError,
        NotImplementedError,
    ) as exc:
        # NotImplementedError is what scipy raises for MATLAB v7.3 (HDF5) files.
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"svhn file {path} is corrupt, truncated or not a MATLAB v5 file ({detail}); "
            "delete it and download it again"
        ) from exc
    if "X" not in mat or "y" not in mat:
        raise DataError(f"svhn file {path} lacks the 'X' or 'y' variable; download it again")
    x, y = mat["X"], mat["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (_SIDE, _SIDE, 3):
        raise DataError(
            f"svhn file {path} holds X of {x.dtype} {x.shape}, expected uint8 (32, 32, 3, N); "
            "download it again"
        )
    labels = np.asarray(y).reshape(-1).astype(np.int64)
    if len(labels) != x.shape[3]:
        raise DataError(
            f"svhn file {path} has {len(labels):,} labels for {x.shape[3]:,} images; "
            "download it again"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 10):
        raise DataError(
            f"svhn file {path} has labels {labels.min()}..{labels.max()}, expected 1..10; "
            "download it again"
        )
    # SVHN stores the digit 0 as label 10.
    labels[labels == 10] = 0
    # X is indexed (H, W, C, N); moving axes gives (N, C, H, W) without copying the pixels.
    images = x.transpose(3, 2, 0, 1)
    return images, labels


def load_svhn(
    data_dir: Path, split: str, *, download: bool | None, num_classes: int | None
) -> ImageDataset:
    """Load SVHN ``split``; see :func:`gradleak.data.load_dataset`."""
    missing = (
        f"svhn {split} files not found: put {file_name(split)} in {data_dir} "
        "(or its svhn/ subfolder), or pass --data-dir"
    )
    path = locate(
        "svhn",
        split,
        data_dir,
        find=lambda d: find_file(d, split),
        missing=missing,
        download_flag=download,
    )
    images, labels = read_mat(path)
    log.debug("svhn %s: %d images from %s", split, len(labels), path)
    return ImageDataset(
        "svhn",
        split=split,
        shape=(3, _SIDE, _SIDE),
        num_classes=num_classes or 10,
        labels=labels,
        loader=array_loader(images),
        class_names=CLASS_NAMES,
        source=path,
    )
