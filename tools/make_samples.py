"""Write the built-in sample sets from the real test data.

Reads the CIFAR-100 and MNIST test files with gradleak's own readers and writes
``src/gradleak/data/samples/mnist.npz`` (8 MNIST test digits, labels, the digit names,
source indices) and ``.../cifar100.npz`` (8 CIFAR-100 test images, their fine labels, the
100 class names and source indices).

The images are real test images picked by index, not the first eight: sample 0 of each set
is the default victim of ``gradleak attack``, and we put first a clear picture that the
paper's protocol (faithful iDLG, seed 0) recovers within its 300 steps, so that the
default run demonstrates the leak in seconds.  The protocol does not recover every image
(``gradleak reproduce`` measures how often it does); the other samples include ones it
misses (MNIST test digits 0 and 2 at seed 0).

Usage:
    python tools/make_samples.py [--data-dir DIR]

``DIR`` defaults to ``$GRADLEAK_DATA`` or ``../shared/data`` next to the repository.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# Lets the tool run from a plain checkout where gradleak is not installed.
sys.path.insert(0, str(REPO / "src"))

from gradleak.data import ImageDataset, load_dataset  # noqa: E402

log = logging.getLogger("make_samples")
OUT_DIR = REPO / "src" / "gradleak" / "data" / "samples"


MNIST_INDICES = (1, 3, 7, 0, 2, 4, 5, 6)
CIFAR100_INDICES = (9, 15, 18, 19, 12, 14, 16, 2)


def _as_uint8(
    dataset: ImageDataset, picked: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    indices = np.array(picked, dtype=np.int64)
    # Items are uint8 / 255 in float32, so rounding x * 255 recovers the stored bytes exactly.
    images = np.stack([np.rint(dataset[int(i)][0].numpy() * 255.0) for i in indices])
    labels = np.array([dataset.label(int(i)) for i in indices], dtype=np.int64)
    return images.astype(np.uint8), labels, indices


def main(argv: list[str] | None = None) -> int:
    """Write both sample files; return the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("GRADLEAK_DATA") or str(REPO.parent / "shared" / "data")
    parser.add_argument("--data-dir", type=Path, default=Path(default))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cifar = load_dataset("cifar100", data_dir=args.data_dir, download=False)
    images, labels, indices = _as_uint8(cifar, CIFAR100_INDICES)
    if cifar.class_names is None or len(cifar.class_names) != 100:
        log.error("the CIFAR-100 meta file with the 100 class names is missing")
        return 1
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT_DIR / "cifar100.npz",
        images=images,
        labels=labels,
        class_names=np.array(cifar.class_names),
        indices=indices,
    )
    log.info(
        "cifar100.npz: labels %s (%s)",
        labels.tolist(),
        ", ".join(cifar.class_names[i] for i in labels),
    )

    mnist = load_dataset("mnist", data_dir=args.data_dir, download=False)
    images, labels, indices = _as_uint8(mnist, MNIST_INDICES)
    np.savez_compressed(
        OUT_DIR / "mnist.npz",
        images=images,
        labels=labels,
        class_names=np.array(mnist.class_names),
        indices=indices,
    )
    log.info("mnist.npz: labels %s", labels.tolist())
    for path in sorted(OUT_DIR.glob("*.npz")):
        log.info("%s: %d bytes", path.relative_to(REPO), path.stat().st_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
