"""The user's own images: a folder of class subfolders, and any dataset fitted to a model.

``load_image_folder(root)`` reads ``root/<class>/<image>`` (the layout of
torchvision's ImageFolder and of most datasets people keep on disk): the
classes are the subfolders in sorted order, labels their positions.  Every
file's header is read up front, so a file that is not an image is named
before any work starts.  Images are resized to the shape asked for (the
model's input); without one they must all have the same size.

``fit_to_shape(dataset, shape)`` gives any dataset the model's shape: one
channel is repeated to three, three are converted to luminance for one, and
the size is changed by Pillow's antialiased bilinear resize.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from gradleak.data.dataset import ImageDataset
from gradleak.data.images import decode_image
from gradleak.errors import DataError

__all__ = ["fit_to_shape", "is_image_folder", "load_image_folder"]

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def is_image_folder(path: Path) -> bool:
    """Whether `path` is a folder with at least one subfolder (a class)."""
    return path.is_dir() and any(child.is_dir() for child in path.iterdir())


def load_image_folder(
    root: str | Path, *, shape: tuple[int, int, int] | None = None
) -> ImageDataset:
    """A dataset of ``root/<class>/<image>`` files.

    Args:
        root: The folder of class subfolders.
        shape: ``(C, H, W)`` to convert and resize every image to; None keeps
            the files' size, which must then be the same for all.

    Raises:
        DataError: No class subfolder or no image, an unreadable image, or
            mixed sizes without a `shape`.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; give a folder of class subfolders of images")
    classes = sorted(child.name for child in root.iterdir() if child.is_dir())
    if not classes:
        raise DataError(
            f"{root} has no class subfolders; put each class's images in a subfolder "
            "(root/cat/1.png, root/dog/2.png, ...)"
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if file.is_file() and file.suffix.lower() in SUFFIXES:
                files.append(file)
                labels.append(label)
    if not files:
        raise DataError(
            f"{root} holds no images in its {len(classes)} class subfolders "
            f"({', '.join(sorted(SUFFIXES))})"
        )
    sizes = {}
    gray = True
    for file in files:
        try:
            with Image.open(file) as image:
                sizes.setdefault(image.size, file)
                gray = gray and image.mode in ("1", "L", "LA", "I", "I;16", "F")
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(
                f"{file} is not a readable image ({error}); remove or replace it"
            ) from None
    if shape is None:
        if len(sizes) > 1:
            (a, first), (b, second) = list(sizes.items())[:2]
            raise DataError(
                f"{root} holds images of different sizes ({first.name} is {a[0]}x{a[1]}, "
                f"{second.name} {b[0]}x{b[1]}); give the model's input shape to resize them"
            )
        (width, height) = next(iter(sizes))
        shape = (1 if gray else 3, height, width)
    target = (int(shape[0]), int(shape[1]), int(shape[2]))
    return ImageDataset(
        root.name or "images",
        shape=target,
        num_classes=len(classes),
        labels=np.array(labels, dtype=np.int64),
        loader=_FileLoader(tuple(files), target),
        class_names=tuple(classes),
        source=root,
    )


class _FileLoader:
    """Decodes file i at the target shape (a class, so that datasets pickle)."""

    def __init__(self, files: tuple[Path, ...], shape: tuple[int, int, int]) -> None:
        self.files, self.shape = files, shape

    def __call__(self, index: int) -> np.ndarray:
        return decode_image(self.files[index], self.shape)


def fit_to_shape(dataset: ImageDataset, shape: tuple[int, int, int]) -> ImageDataset:
    """`dataset` with every image converted to `shape` (channels, then size); itself if equal."""
    target = (int(shape[0]), int(shape[1]), int(shape[2]))
    if tuple(dataset.shape) == target:
        return dataset
    if target[0] not in (1, 3) or dataset.shape[0] not in (1, 3):
        raise DataError(
            f"cannot turn {dataset.name}'s {dataset.shape[0]}-channel images into "
            f"{target[0]}-channel ones; give data with the model's channels"
        )
    return ImageDataset(
        dataset.name,
        shape=target,
        num_classes=dataset.num_classes,
        labels=dataset.labels,
        loader=_Refit(dataset, target),
        split=dataset.split,
        class_names=dataset.class_names,
        source=dataset.source,
    )


class _Refit:
    def __init__(self, dataset: ImageDataset, shape: tuple[int, int, int]) -> None:
        self.dataset, self.shape = dataset, shape

    def __call__(self, index: int) -> np.ndarray:
        image, _ = self.dataset[index]
        pixels = (image.clamp(0, 1) * 255).round().to("cpu").numpy().astype(np.uint8)
        picture = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
        picture = picture.convert("L" if self.shape[0] == 1 else "RGB")
        if picture.size != (self.shape[2], self.shape[1]):
            picture = picture.resize((self.shape[2], self.shape[1]), Image.Resampling.BILINEAR)
        array = np.asarray(picture, dtype=np.uint8)
        return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))
