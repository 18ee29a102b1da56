"""Measure the Inverting Gradients settings `gradleak audit` uses on multi-step updates.

The setting of `gradleak flower-demo --local-steps 4`: iDLG's LeNet (seed 0),
one MNIST test image per client, 4 local SGD steps at lr 0.01 on it
(`gradleak.threat.observe_update`), labels read from the update.  For each
image and each (total-variation weight, steps) pair, Inverting Gradients
(`InvertingGradients`, seed 0) rebuilds the image; the table shows the MSE
against the private image.

Usage:
    python tools/audit_ig_settings.py [--images 3] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import time

import torch

from gradleak import build_model, observe_update
from gradleak.attacks.inverting import IGConfig, InvertingGradients
from gradleak.data import load_dataset

SETTINGS = ((0.2, 500), (1e-3, 500), (1e-3, 1000), (1e-4, 500))
FIRST = 100  # test images FIRST, FIRST + 1, ...


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist", data_dir=args.data_dir)
    model = build_model("lenet", input_shape=data.shape, num_classes=data.num_classes, seed=0)
    print("| image | label | " + " | ".join(f"TV {tv:g}, {n} steps" for tv, n in SETTINGS) + " |")
    print("|---|---|" + "---|" * len(SETTINGS))
    started = time.perf_counter()
    for index in range(FIRST, FIRST + args.images):
        image, label = data[index]
        seen = observe_update(
            model, image[None], torch.tensor([label]), local_lr=0.01, local_steps=4, seed=0
        )
        cells = []
        for tv, steps in SETTINGS:
            attack = InvertingGradients(
                IGConfig(iterations=steps, tv_scale=tv, snapshot_every=steps)
            )
            result = attack(seen, seed=0)
            cells.append(f"{float(((result.inputs.float() - image) ** 2).mean()):.1e}")
        print(f"| {index} | {label} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s on one thread")


if __name__ == "__main__":
    main()
