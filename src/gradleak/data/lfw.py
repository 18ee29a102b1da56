"""Labeled Faces in the Wild: ``lfw/<Person>/<Person>_NNNN.jpg``.

Only the folder listing happens up front; each JPEG is decoded (RGB, resized to
32x32) when it is accessed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from gradleak.data.dataset import ImageDataset
from gradleak.data.images import decode_image
from gradleak.data.locate import candidate_dirs, locate
from gradleak.errors import DataError

log = logging.getLogger(__name__)

SHAPE = (3, 32, 32)
NUM_PEOPLE = 5749  # people in the full LFW set
_SUFFIXES = {".jpg", ".jpeg", ".png"}


class FileLoader:
    """Decodes image files on access (picklable, unlike a closure)."""

    def __init__(self, paths: list[Path], shape: tuple[int, int, int]) -> None:
        self.paths = paths
        self.shape = shape

    def __call__(self, index: int) -> np.ndarray:
        return decode_image(self.paths[index], self.shape)


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in _SUFFIXES and not p.name.startswith(".")
    )


def _person_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _looks_like_lfw(folder: Path) -> bool:
    # LFW's naming (a person folder holding <folder>_NNNN.jpg) tells its root apart from a
    # data folder that merely has subfolders, such as one that also holds mnist/ and lfw/.
    if not folder.is_dir():
        return False
    for person in _person_dirs(folder):
        for path in person.iterdir():
            if path.name.startswith(f"{person.name}_") and path.suffix.lower() in _SUFFIXES:
                return True
    return False


def find_root(data_dir: Path) -> Path | None:
    """First candidate folder laid out like LFW, or ``None``."""
    for folder in candidate_dirs(data_dir, "lfw", "lfw"):
        if _looks_like_lfw(folder):
            return folder
    return None


def load_lfw(
    data_dir: Path, split: str, *, download: bool | None, num_classes: int | None
) -> ImageDataset:
    """Load LFW; see :func:`gradleak.data.load_dataset`.

    LFW has no train/test split here: both ``"test"`` and ``"train"`` mean every image.
    Labels are the person's position among the sorted person folders, images are listed
    folder by folder with file names sorted.
    """
    missing = (
        f"lfw images not found: put the lfw/ folder (lfw/<Person>/<Person>_0001.jpg ...) in "
        f"{data_dir}, or pass --data-dir"
    )
    root = locate("lfw", split, data_dir, find=find_root, missing=missing, download_flag=download)
    paths: list[Path] = []
    labels: list[int] = []
    names: list[str] = []
    for person in _person_dirs(root):
        images = _images_in(person)
        if not images:
            continue
        labels.extend([len(names)] * len(images))
        names.append(person.name)
        paths.extend(images)
    if not paths:
        raise DataError(f"lfw folder {root} holds no images; download LFW again")
    classes = NUM_PEOPLE if num_classes is None else num_classes
    if len(names) > classes:
        raise DataError(
            f"lfw folder {root} holds {len(names):,} people, more than num_classes={classes:,}; "
            "pass a larger num_classes or use fewer people"
        )
    log.debug("lfw: %d images of %d people in %s", len(paths), len(names), root)

    return ImageDataset(
        "lfw",
        split=None,
        shape=SHAPE,
        num_classes=classes,
        labels=np.asarray(labels, dtype=np.int64),
        loader=FileLoader(paths, SHAPE),
        class_names=tuple(names),
        source=root,
    )
