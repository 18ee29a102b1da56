"""CIFAR-10 and CIFAR-100, python version (pickled batches)."""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradleak.data.dataset import ImageDataset, array_loader
from gradleak.data.locate import candidate_dirs, locate
from gradleak.errors import DataError

log = logging.getLogger(__name__)

_SIDE = 32
_ROW = 3 * _SIDE * _SIDE


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps what."""

    name: str
    subfolder: str
    batches: dict[str, tuple[str, ...]]
    meta: str
    label_key: bytes
    names_key: bytes
    num_classes: int


CIFAR100 = CifarLayout(
    "cifar100",
    "cifar-100-python",
    {"test": ("test",), "train": ("train",)},
    "meta",
    b"fine_labels",
    b"fine_label_names",
    100,
)
CIFAR10 = CifarLayout(
    "cifar10",
    "cifar-10-batches-py",
    {"test": ("test_batch",), "train": tuple(f"data_batch_{i}" for i in range(1, 6))},
    "batches.meta",
    b"labels",
    b"label_names",
    10,
)

# A CIFAR pickle only ever refers to these numpy internals (the names differ between
# numpy 1 and 2, and between pickle protocols). Refusing everything else means a
# hostile file in the data folder cannot run code when it is read.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in the pickle")
        return super().find_class(module, name)


_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    ImportError,
    OverflowError,
    MemoryError,
)


def read_pickle(path: Path, dataset: str) -> dict[bytes, Any]:
    """Unpickle a CIFAR file (a dict with bytes keys).

    Raises:
        DataError: If the file is unreadable, truncated or not a CIFAR pickle.
    """
    try:
        with path.open("rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DataError(f"cannot read {dataset} file {path}: {exc.strerror or exc}") from exc
    except _PICKLE_ERRORS as exc:
        raise DataError(
            f"{dataset} file {path} is corrupt or truncated ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); delete it and download "
            "it again"
        ) from exc
    if not isinstance(obj, dict):
        raise DataError(
            f"{dataset} file {path} is not a CIFAR batch (it holds a {type(obj).__name__}); "
            "download it again"
        )
    return obj


def _read_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    batch = read_pickle(path, layout.name)
    if b"data" not in batch or layout.label_key not in batch:
        keys = ", ".join(
            sorted(k.decode("latin1") if isinstance(k, bytes) else str(k) for k in batch)
        )
        raise DataError(
            f"{layout.name} file {path} lacks 'data' or '{layout.label_key.decode()}' "
            f"(it has: {keys or 'nothing'}); is it a {layout.name} file? download it again"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[layout.label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        raise DataError(
            f"{layout.name} file {path} holds data of {data.dtype} {data.shape}, expected uint8 "
            f"(N, {_ROW}); download it again"
        )
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{layout.name} file {path} has {labels.size:,} labels for {len(data):,} images; "
            "download it again"
        )
    return data, labels


def _read_class_names(path: Path, layout: CifarLayout) -> tuple[str, ...] | None:
    meta = read_pickle(path, layout.name)
    names = meta.get(layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes:
        log.warning(
            "%s: %s has no usable %r; class names unknown", layout.name, path, layout.names_key
        )
        return None
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)


def find_folder(data_dir: Path, layout: CifarLayout, split: str) -> Path | None:
    """First candidate folder holding every batch file of ``split``, or ``None``."""
    for folder in candidate_dirs(data_dir, layout.name, layout.subfolder):
        if all((folder / b).is_file() for b in layout.batches[split]):
            return folder
    return None


def load_cifar(
    layout: CifarLayout,
    data_dir: Path,
    split: str,
    *,
    download: bool | None,
    num_classes: int | None,
) -> ImageDataset:
    """Load a CIFAR variant's ``split``; see :func:`gradleak.data.load_dataset`."""
    files = layout.batches[split]
    wanted = files[0] if len(files) == 1 else f"{files[0]} .. {files[-1]}"
    missing = (
        f"{layout.name} {split} files not found: put the {layout.subfolder}/ folder (with "
        f"{wanted} and {layout.meta}) in {data_dir}, or pass --data-dir"
    )
    folder = locate(
        layout.name,
        split,
        data_dir,
        find=lambda d: find_folder(d, layout, split),
        missing=missing,
        download_flag=download,
    )
    parts = [_read_batch(folder / f, layout) for f in files]
    data = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    meta_path = folder / layout.meta
    class_names = _read_class_names(meta_path, layout) if meta_path.is_file() else None
    log.debug("%s %s: %d images from %s", layout.name, split, len(data), folder)
    # Rows are channel-major (all R, then G, then B), so a plain reshape gives (C, H, W).
    images = data.reshape(-1, 3, _SIDE, _SIDE)
    return ImageDataset(
        layout.name,
        split=split,
        shape=(3, _SIDE, _SIDE),
        num_classes=num_classes or layout.num_classes,
        labels=labels,
        loader=array_loader(images),
        class_names=class_names,
        source=folder,
    )
