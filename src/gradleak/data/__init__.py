"""Dataset readers: MNIST, CIFAR-10/100, SVHN, LFW, built-in samples and single images.

Every reader returns an :class:`ImageDataset` whose items are ``(image, label)`` with
``image`` a float32 ``(C, H, W)`` tensor in ``[0, 1]`` (no normalisation).

Example:
    >>> from gradleak.data import load_dataset
    >>> ds = load_dataset("sample")
    >>> image, label = ds[0]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gradleak.data.builtin import SAMPLES, load_sample
from gradleak.data.cifar import CIFAR10, CIFAR100, load_cifar
from gradleak.data.dataset import ImageDataset, array_loader
from gradleak.data.folder import fit_to_shape, is_image_folder, load_image_folder
from gradleak.data.images import decode_image, load_image
from gradleak.data.lfw import load_lfw
from gradleak.data.locate import default_data_dir, resolve_data_dir
from gradleak.data.mnist import load_mnist
from gradleak.data.svhn import load_svhn
from gradleak.errors import ConfigError

__all__ = [
    "DATASETS",
    "FULL_SIZES",
    "ImageDataset",
    "default_data_dir",
    "load_dataset",
    "load_image",
]

DATASETS: tuple[str, ...] = (
    "sample",
    "sample-cifar100",
    "mnist",
    "cifar100",
    "cifar10",
    "lfw",
    "svhn",
)
SPLITS = ("test", "train")

# Images in each dataset's full test split (LFW has no split: all of its images, of
# 5,749 people), so a report can tell a partial copy from the whole.
FULL_SIZES: dict[str, int] = {
    "mnist": 10_000,
    "cifar100": 10_000,
    "cifar10": 10_000,
    "lfw": 13_233,
    "svhn": 26_032,
}

# Classes of the datasets whose label set is fixed (LFW's depends on num_classes).
_FIXED_CLASSES = {"mnist": 10, "cifar100": 100, "cifar10": 10, "svhn": 10}
_ALIASES = {
    "cifar-100": "cifar100",
    "cifar-10": "cifar10",
    "sample-mnist": "sample",
    "mnist-sample": "sample",
}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
IMAGE_SHAPE = (3, 32, 32)


def _looks_like_path(name: str) -> bool:
    return "/" in name or "\\" in name or Path(name).suffix.lower() in _IMAGE_SUFFIXES


def _load_single_image(path: Path, num_classes: int | None) -> ImageDataset:
    # A lone image has no true label; 0 is a placeholder the attacks never rely on.
    pixels = decode_image(path, IMAGE_SHAPE)
    return ImageDataset(
        "image",
        shape=IMAGE_SHAPE,
        num_classes=num_classes or 10,
        labels=np.zeros(1, dtype=np.int64),
        loader=array_loader(pixels[None]),
        source=path,
    )


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    split: str = "test",
    download: bool | None = None,
    num_classes: int | None = None,
    shape: tuple[int, int, int] | None = None,
) -> ImageDataset:
    """Load a dataset by name, a folder of class subfolders, or a single image by path.

    Files are looked for in ``data_dir``, ``data_dir/<usual subfolder>``,
    ``data_dir/<name>`` and ``data_dir/<name>/<usual subfolder>`` (usual subfolders:
    ``MNIST/raw``, ``cifar-100-python``, ``cifar-10-batches-py``, ``lfw``).

    Args:
        name: One of :data:`DATASETS`, or the path of an image file, which gives a
            one-image dataset named ``"image"`` (RGB, resized to 32x32, label 0).
        data_dir: The data folder; default :func:`default_data_dir`.
        split: ``"test"`` or ``"train"``. LFW has no split (both mean every image); the
            built-in samples and single images only have ``"test"``.
        download: Fetch missing files from the official source: ``True`` always,
            ``False`` never, ``None`` unless ``$GRADLEAK_NO_DOWNLOAD`` is set.
        num_classes: Number of classes; LFW defaults to 5749 (all its people), a
            single image to 10. For other datasets it may only raise the count.
        shape: ``(C, H, W)`` the images are converted to (the model's input):
            channels repeated or turned to luminance, size resized (`data.folder`).
            None keeps the dataset's own (a folder's images must then be of one size).

    Returns:
        The dataset.

    Raises:
        ConfigError: Unknown name or split, or an impossible ``num_classes``.
        DataError: Files missing (and not downloadable), corrupt or empty.
    """
    dataset = _load(str(name), data_dir, split, download, num_classes, shape)
    return dataset if shape is None else fit_to_shape(dataset, shape)


def _load(
    name: str,
    data_dir: str | Path | None,
    split: str,
    download: bool | None,
    num_classes: int | None,
    shape: tuple[int, int, int] | None,
) -> ImageDataset:
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: choose test or train")
    if num_classes is not None and num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    natural = _FIXED_CLASSES.get(key) or (SAMPLES[key][1] if key in SAMPLES else None)
    if natural is not None and num_classes is not None and num_classes < natural:
        raise ConfigError(f"{key} has {natural} classes; num_classes={num_classes} is too few")

    if key not in DATASETS and is_image_folder(Path(name).expanduser()):
        if split != "test":
            raise ConfigError(f"a folder of images has no {split!r} split; leave --split out")
        folder = load_image_folder(Path(name), shape=shape)
        if num_classes is not None and num_classes < folder.num_classes:
            raise ConfigError(
                f"{name} has {folder.num_classes} class folders; num_classes={num_classes} "
                "is too few"
            )
        return folder
    if key not in DATASETS:
        if not (_looks_like_path(name) or Path(name).exists()):
            raise ConfigError(
                f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, "
                "or give a folder of class subfolders of images, or a path to an image"
            )
        if split != "test":
            raise ConfigError(f"a single image has only a test split, not {split!r}")
        return _load_single_image(Path(name).expanduser(), num_classes)
    if key in SAMPLES:
        if split != "test":
            raise ConfigError(f"the built-in samples have only a test split, not {split!r}")
        return load_sample(key, num_classes=num_classes)

    root = resolve_data_dir(data_dir)
    if key == "mnist":
        return load_mnist(root, split, download=download, num_classes=num_classes)
    if key == "cifar100":
        return load_cifar(CIFAR100, root, split, download=download, num_classes=num_classes)
    if key == "cifar10":
        return load_cifar(CIFAR10, root, split, download=download, num_classes=num_classes)
    if key == "svhn":
        return load_svhn(root, split, download=download, num_classes=num_classes)
    return load_lfw(root, split, download=download, num_classes=num_classes)
