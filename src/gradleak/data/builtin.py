"""The small sample sets shipped inside the package (no data folder needed).

``samples/cifar100.npz`` and ``samples/mnist.npz`` are written by
``tools/make_samples.py`` from real test images (see there which, and why).
"""

from __future__ import annotations

import logging
import zipfile
from importlib import resources

import numpy as np

from gradleak.data.dataset import ImageDataset, array_loader
from gradleak.errors import DataError

log = logging.getLogger(__name__)

# name -> (file in samples/, number of classes of the source dataset)
SAMPLES: dict[str, tuple[str, int]] = {
    "sample": ("mnist.npz", 10),
    "sample-cifar100": ("cifar100.npz", 100),
}


def _read_npz(filename: str) -> dict[str, np.ndarray]:
    resource = resources.files("gradleak.data").joinpath("samples", filename)
    try:
        with resource.open("rb") as f, np.load(f, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except FileNotFoundError as exc:
        raise DataError(
            f"built-in sample file samples/{filename} is missing from the gradleak package; "
            "reinstall gradleak (or run tools/make_samples.py in a source checkout)"
        ) from exc
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"built-in sample file samples/{filename} is corrupt ({exc}); reinstall gradleak"
        ) from exc


def load_sample(name: str, *, num_classes: int | None = None) -> ImageDataset:
    """Load a built-in sample set (``"sample"`` MNIST digits or ``"sample-cifar100"``).

    Args:
        name: A key of :data:`SAMPLES`.
        num_classes: Override the number of classes (default: that of the source dataset).

    Raises:
        DataError: If the packaged file is missing or corrupt.
    """
    filename, classes = SAMPLES[name]
    arrays = _read_npz(filename)
    try:
        images, labels = arrays["images"], arrays["labels"]
    except KeyError as exc:
        raise DataError(f"built-in sample file samples/{filename} lacks {exc}") from exc
    names = arrays.get("class_names")
    class_names = tuple(str(n) for n in names) if names is not None else None
    log.debug("%s: %d built-in images of shape %s", name, len(images), images.shape[1:])
    return ImageDataset(
        name,
        shape=tuple(images.shape[1:]),
        num_classes=num_classes or classes,
        labels=labels,
        loader=array_loader(images),
        class_names=class_names,
    )
