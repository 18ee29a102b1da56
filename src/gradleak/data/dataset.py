"""The dataset object every reader returns.

A reader keeps its images in whatever form is cheapest (a uint8 array, a list of
file paths) and hands :class:`ImageDataset` a function that produces one uint8
``(C, H, W)`` array per index. Conversion to float happens per item, so a full
training set never exists as float32 in memory.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from gradleak.errors import DataError

ImageLoader = Callable[[int], np.ndarray]


class ImageDataset:
    """A read-only, indexable image classification dataset.

    Attributes:
        name: Dataset name, e.g. ``"mnist"``, ``"cifar100"``, ``"lfw"``, ``"sample"``, ``"image"``.
        split: ``"test"`` or ``"train"``, or ``None`` where the dataset has no split (LFW,
            the built-in samples, a single image).
        num_classes: Number of classes a classifier for this dataset must have.
        shape: ``(C, H, W)`` of every image returned by ``__getitem__``.
        class_names: Human-readable name of each label, or ``None`` when unknown. For an
            LFW subset it lists only the people present, so it can be shorter than
            ``num_classes``; ``class_names[label]`` is always valid.
        source: The file or folder the data came from (``None`` for built-in samples).
    """

    def __init__(
        self,
        name: str,
        *,
        shape: tuple[int, int, int],
        num_classes: int,
        labels: np.ndarray,
        loader: ImageLoader,
        split: str | None = None,
        class_names: tuple[str, ...] | None = None,
        source: Path | None = None,
    ) -> None:
        """Create a dataset.

        Args:
            name: Dataset name.
            shape: ``(C, H, W)`` of every image.
            num_classes: Number of classes.
            labels: One integer label per image, all in ``[0, num_classes)``.
            loader: Returns the uint8 ``(C, H, W)`` image for a valid index; it may raise
                :class:`DataError` (e.g. for a corrupt file).
            split: ``"test"``/``"train"`` or ``None``.
            class_names: Optional name per label.
            source: Where the data came from.

        Raises:
            DataError: If there are no images or a label is outside ``[0, num_classes)``.
        """
        self.name = name
        self.split = split
        self.shape = tuple(int(s) for s in shape)
        self.num_classes = int(num_classes)
        self.class_names = class_names
        self.source = source
        # A private copy: freezing the caller's own array would surprise them.
        labels = np.array(labels, dtype=np.int64).reshape(-1)
        labels.setflags(write=False)
        self._labels = labels
        self._loader = loader
        where = f" in {source}" if source is not None else ""
        if len(labels) == 0:
            raise DataError(f"{self._describe()} has no images{where}")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= self.num_classes:
            raise DataError(
                f"{self._describe()} has labels {low}..{high}{where}, but only "
                f"{self.num_classes} classes (0..{self.num_classes - 1}): the file is corrupt; "
                "download it again"
            )

    def _describe(self) -> str:
        return f"{self.name} {self.split}" if self.split else self.name

    def _check_index(self, index: int) -> int:
        # operator.index rejects floats and strings with a TypeError, which is a caller bug.
        i = operator.index(index)
        n = len(self._labels)
        if not 0 <= i < n:
            noun = "image" if n == 1 else "images"
            raise DataError(
                f"index {i} is out of range: {self._describe()} has {n:,} {noun} (0..{n - 1})"
            )
        return i

    @property
    def labels(self) -> np.ndarray:
        """All labels as a read-only int64 array (no image is decoded)."""
        return self._labels

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Return ``(image, label)``: a float32 ``(C, H, W)`` tensor in ``[0, 1]`` and an int.

        Raises:
            DataError: If the index is out of range or the image cannot be decoded.
        """
        i = self._check_index(index)
        pixels = np.asarray(self._loader(i))
        if pixels.shape != self.shape or pixels.dtype != np.uint8:
            raise DataError(
                f"{self._describe()} image {i} decoded to {pixels.dtype} {pixels.shape}, "
                f"expected uint8 {self.shape}; the data is corrupt"
            )
        image = torch.from_numpy(pixels.astype(np.float32)).div_(255.0)
        return image, int(self._labels[i])

    def label(self, index: int) -> int:
        """Return the label of ``index`` without decoding the image.

        Raises:
            DataError: If the index is out of range.
        """
        return int(self._labels[self._check_index(index)])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        # Defined explicitly: the fallback sequence protocol stops only on IndexError,
        # and out-of-range access raises DataError here.
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, len={len(self)}, "
            f"shape={self.shape}, num_classes={self.num_classes})"
        )


class ArrayLoader:
    """Loader over an in-memory ``(N, C, H, W)`` uint8 array (or a view of one).

    A class rather than a closure so that datasets pickle (DataLoader workers under
    the ``spawn`` start method need that).
    """

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __call__(self, index: int) -> np.ndarray:
        return np.ascontiguousarray(self.images[index])


def array_loader(images: np.ndarray) -> ImageLoader:
    """Loader over an in-memory ``(N, C, H, W)`` uint8 array (or a view of one)."""
    return ArrayLoader(images)
