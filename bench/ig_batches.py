"""Inverting Gradients' default on batches: where the images stop being recognisable.

A ConvNet trained by `gradleak train` (``--weights``; MNIST: the one of
`bench/ig_defaults.py`), batches of B consecutive held-out images of its split
(``--dataset``, ``--width`` as trained), labels inferred, default options, one
BatchNorm mode per run.  Per batch: mean PSNR (reconstructions
paired with the originals by the optimal assignment), the share of images at
SSIM >= 0.5, whether the label multiset is right, steps, seconds.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ig_batches.py --weights W --sizes 2,4,8
    OMP_NUM_THREADS=1 .venv/bin/python bench/ig_batches.py --weights W --dataset cifar100 \
        --width 16 --sizes 4,8
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from gradleak import build_model, observe
from gradleak.attacks.inverting import IGConfig, InvertingGradients
from gradleak.data import load_dataset
from gradleak.experiments.train.run import split_indices
from gradleak.metrics import match_reconstructions, psnr, ssim
from gradleak.models.weights import load_weights

DATA = Path(os.environ.get("GRADLEAK_DATA", Path(__file__).resolve().parents[2] / "shared/data"))


def victims(
    weights: str, count: int, dataset: str = "mnist", width: int = 32
) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, int]]]:
    """The trained ConvNet and the first `count` held-out images of its split."""
    data = load_dataset(dataset, data_dir=DATA, download=False)
    _, held_out = split_indices(len(data), 0)
    model = build_model(
        "convnet",
        input_shape=data.shape,
        num_classes=data.num_classes,
        seed=0,
        width=width,
    )
    load_weights(model, weights)
    return model, [data[int(i)] for i in held_out[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--sizes", default="2,4,8")
    parser.add_argument("--mode", default="eval")
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--dataset", default="mnist", help="mnist or cifar100")
    parser.add_argument("--width", type=int, default=32, help="the ConvNet's width as trained")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [int(b) for b in args.sizes.split(",")]
    model, chosen = victims(args.weights, max(sizes) * args.batches, args.dataset, args.width)
    attack = InvertingGradients(IGConfig(snapshot_every=10**9))
    print("| dataset | mode | B | batch | PSNR mean | SSIM >= 0.5 | labels | steps | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        for k in range(args.batches):
            pairs = chosen[k * size : (k + 1) * size]
            x = torch.stack([image for image, _ in pairs])
            y = torch.tensor([label for _, label in pairs])
            observation = observe(model, x, y, batchnorm=args.mode)
            start = time.perf_counter()
            result = attack(observation, seed=k)
            seconds = time.perf_counter() - start
            order, _ = match_reconstructions(result.inputs, x)
            rec = result.inputs[order]
            scores = [psnr(rec[i], x[i]) for i in range(size)]
            similar = sum(ssim(rec[i][None], x[i][None]) >= 0.5 for i in range(size))
            right = sorted(result.labels.tolist()) == sorted(y.tolist())
            print(
                f"| {args.dataset} | {args.mode} | {size} | {k} | {sum(scores) / size:.1f} | "
                f"{similar}/{size} | "
                f"{'right' if right else 'wrong'} | {result.steps} | {seconds:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
