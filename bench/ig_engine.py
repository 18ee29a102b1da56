"""Inverting Gradients, sequential vs batched (`attack_victims`), on the same victims.

Each setting builds V victims (real test images, labels inferred), attacks
them one after another with `InvertingGradients` and together with
`attacks.inverting_engine.attack_victims`, the two paths taking turns
`--repeats` times, and reports milliseconds per victim and iteration (median
over the repeats) and the ratio.

    .venv/bin/python bench/ig_engine.py --victims 8 --iterations 10

Settings: the papers' sigmoid LeNet (a fresh model per victim) and the ReLU +
BatchNorm convnet at width 8 (the `reproduce ig` default), on MNIST and
CIFAR-100, one image per victim (FedSGD) or four (FedAvg, 4 local steps of
2), BatchNorm in train or eval mode, one shared trained-like model or a fresh
one per victim.  Needs the real data (GRADLEAK_DATA or ../shared/data).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from gradleak import build_model, observe, observe_update
from gradleak.attacks import IGConfig, InvertingGradients
from gradleak.attacks.inverting_engine import attack_victims
from gradleak.data import load_dataset

DATA = Path(os.environ.get("GRADLEAK_DATA", Path(__file__).resolve().parents[2] / "shared/data"))

SETTINGS = (
    # (name, model, dataset, images, local steps, BatchNorm mode, weights)
    ("lenet, MNIST, B=1", "lenet", "mnist", 1, 1, "train", "own"),
    ("convnet w8, MNIST, B=1, train", "convnet", "mnist", 1, 1, "train", "shared"),
    ("convnet w8, MNIST, B=1, eval", "convnet", "mnist", 1, 1, "eval", "shared"),
    ("convnet w8, CIFAR-100, B=1, train", "convnet", "cifar100", 1, 1, "train", "shared"),
    ("convnet w8, CIFAR-100, B=1, train, own weights", "convnet", "cifar100", 1, 1, "train", "own"),
    ("convnet w8, CIFAR-100, B=1, eval", "convnet", "cifar100", 1, 1, "eval", "shared"),
    ("convnet w8, CIFAR-100, B=4 K=4, train", "convnet", "cifar100", 4, 4, "train", "shared"),
)


def victims(model_name: str, dataset: str, images: int, steps: int, mode: str, weights: str,
            count: int) -> list:  # fmt: skip
    data = load_dataset(dataset, data_dir=DATA, download=False)
    generator = torch.Generator().manual_seed(0)
    out = []
    for v in range(count):
        indices = torch.randperm(len(data), generator=generator)[:images].tolist()
        x = torch.stack([data[i][0] for i in indices])
        y = torch.tensor([data[i][1] for i in indices])
        width = 8 if model_name == "convnet" else None
        seed = v if weights == "own" else 0
        model = build_model(model_name, input_shape=data.shape, num_classes=data.num_classes,
                            seed=seed, width=width)  # fmt: skip
        if steps == 1:
            out.append(observe(model, x, y, batchnorm=mode))
        else:
            schedule = {"local_steps": steps, "local_batch": max(1, images // 2)}
            out.append(
                observe_update(model, x, y, local_lr=1e-3, seed=v, batchnorm=mode, **schedule)
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--victims", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    attack = InvertingGradients(
        IGConfig.paper(iterations=args.iterations, snapshot_every=args.iterations)
    )
    per = args.victims * args.iterations
    print(f"{args.victims} victims, {args.iterations} iterations, median of {args.repeats}, "
          "ms per victim and iteration, one thread")  # fmt: skip
    print("| setting | sequential | batched | batched vs sequential |")
    print("|---|---|---|---|")
    for name, model, dataset, images, steps, mode, weights in SETTINGS:
        observations = victims(model, dataset, images, steps, mode, weights, args.victims)
        seeds = list(range(len(observations)))
        times: dict[str, list[float]] = {"sequential": [], "batched": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            for obs, seed in zip(observations, seeds, strict=True):
                attack(obs, seed=seed)
            times["sequential"].append(time.perf_counter() - start)
            start = time.perf_counter()
            attack_victims(attack, observations, seeds=seeds)
            times["batched"].append(time.perf_counter() - start)
        seq = 1e3 * statistics.median(times["sequential"]) / per
        bat = 1e3 * statistics.median(times["batched"]) / per
        print(f"| {name} | {seq:.2f} | {bat:.2f} | {seq / bat:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
