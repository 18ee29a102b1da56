"""MNIST in its original IDX files (gzipped or not)."""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path

import numpy as np

from gradleak.data.dataset import ImageDataset, array_loader
from gradleak.data.locate import candidate_dirs, locate
from gradleak.errors import DataError

log = logging.getLogger(__name__)

SUBFOLDER = "MNIST/raw"
_PREFIX = {"test": "t10k", "train": "train"}
_IMAGE_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_LABEL_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_SIDE = 28
CLASS_NAMES = tuple(str(d) for d in range(10))


def file_names(split: str) -> tuple[str, str]:
    """Uncompressed IDX file names (images, labels) of a split."""
    prefix = _PREFIX[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _pick(folder: Path, name: str) -> Path | None:
    # The raw file is preferred because it needs no decompression.
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_files(data_dir: Path, split: str) -> tuple[Path, Path] | None:
    """First candidate folder holding both IDX files of ``split``, or ``None``."""
    images_name, labels_name = file_names(split)
    for folder in candidate_dirs(data_dir, "mnist", SUBFOLDER):
        images, labels = _pick(folder, images_name), _pick(folder, labels_name)
        if images is not None and labels is not None:
            return images, labels
    return None


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"mnist file {path} is corrupt or truncated ({exc}); delete it and download it again"
        ) from exc


def read_idx(path: Path, magic: int, dims: tuple[int, ...]) -> np.ndarray:
    """Parse an IDX file of unsigned bytes.

    Args:
        path: The file (``.gz`` or raw).
        magic: Expected magic number (``0x803`` images, ``0x801`` labels).
        dims: Expected trailing dimensions after the item count (``(28, 28)`` or ``()``).

    Returns:
        A read-only uint8 array of shape ``(count, *dims)``.

    Raises:
        DataError: If the magic, the dimensions or the byte count are wrong.
    """
    data = _read_bytes(path)
    ndim = 1 + len(dims)
    header = 4 + 4 * ndim

    def corrupt(why: str) -> DataError:
        return DataError(
            f"mnist file {path} is corrupt or truncated ({why}); delete it and download it again"
        )

    if len(data) < header:
        raise corrupt(f"{len(data)} bytes, shorter than its header")
    found_magic = int.from_bytes(data[:4], "big")
    if found_magic != magic:
        raise corrupt(f"magic number {found_magic:#x}, expected {magic:#x}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if shape[1:] != dims:
        raise corrupt(f"item shape {shape[1:]}, expected {dims}")
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise corrupt(f"{len(data):,} bytes, expected {expected:,} for {shape[0]:,} items")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist(
    data_dir: Path, split: str, *, download: bool | None, num_classes: int | None
) -> ImageDataset:
    """Load MNIST ``split`` from ``data_dir``; see :func:`gradleak.data.load_dataset`."""
    images_name, labels_name = file_names(split)
    missing = (
        f"mnist {split} files not found: put {images_name}.gz and {labels_name}.gz in "
        f"{data_dir} (or its {SUBFOLDER}/ subfolder), or pass --data-dir"
    )
    images_path, labels_path = locate(
        "mnist",
        split,
        data_dir,
        find=lambda d: find_files(d, split),
        missing=missing,
        download_flag=download,
    )
    images = read_idx(images_path, _IMAGE_MAGIC, (_SIDE, _SIDE))
    labels = read_idx(labels_path, _LABEL_MAGIC, ())
    if len(images) != len(labels):
        raise DataError(
            f"mnist {split}: {images_path} has {len(images):,} images but {labels_path} has "
            f"{len(labels):,} labels; download both files again"
        )
    log.debug("mnist %s: %d images from %s", split, len(images), images_path.parent)
    return ImageDataset(
        "mnist",
        split=split,
        shape=(1, _SIDE, _SIDE),
        num_classes=num_classes or 10,
        labels=labels,
        loader=array_loader(images[:, None, :, :]),
        class_names=CLASS_NAMES,
        source=images_path.parent,
    )
