"""Inverting Gradients' candidate settings side by side on the same seeded victims.

A trained ConvNet (``gradleak train --model convnet --dataset mnist --epochs
1``, passed as ``--weights``), held-out MNIST images (the 20% `gradleak
train` did not train on, in the split's seeded order), one image per victim,
labels inferred, in both BatchNorm modes.  Every candidate attacks every
victim with the same seed; the table gives median and worst PSNR (of the
image as rebuilt), median SSIM, median steps and seconds per attack.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ig_defaults.py --weights W --victims 8

``--candidates`` picks among CANDIDATES by name (comma-separated), ``--first``
skips victims before it (to rerun a few).  Each victim meets every candidate
in turn, so that a changing load on a shared machine falls on them alike;
``restarts-parallel`` runs on two cores (`IGConfig.parallel`), the others on one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import torch

from gradleak import build_model, observe
from gradleak.attacks.inverting import IGConfig, InvertingGradients
from gradleak.data import load_dataset
from gradleak.experiments.train.run import split_indices
from gradleak.metrics import psnr, ssim
from gradleak.models.weights import load_weights

DATA = Path(os.environ.get("GRADLEAK_DATA", Path(__file__).resolve().parents[2] / "shared/data"))

FIXED = 400  # steps of the fixed-count candidates
CANDIDATES = {
    # the old default (the paper's), its schedule scaled down to FIXED steps
    "paper": IGConfig.paper(iterations=FIXED),
    "paper+bn-first-0.1": IGConfig.paper(iterations=FIXED, bn_prior=0.1),
    "paper+bn-all-0.01": IGConfig.paper(iterations=FIXED, feature_prior=0.01),
    "paper+bn-all-0.1": IGConfig.paper(iterations=FIXED, feature_prior=0.1),
    "paper+midgray": IGConfig.paper(iterations=FIXED, init="midgray"),
    "plateau": IGConfig(iterations=FIXED, bn_prior=0.0),
    "default": IGConfig(),
    "default-window-100": IGConfig(window=100),
    # two cores: the default's trial and a second start at once, the better kept
    "restarts-parallel": IGConfig(restarts=1, parallel=2),
}


def victims(weights: str, count: int) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, int]]]:
    data = load_dataset("mnist", data_dir=DATA, download=False)
    _, held_out = split_indices(len(data), 0)
    model = build_model("convnet", input_shape=data.shape, num_classes=data.num_classes, seed=0)
    load_weights(model, weights)
    return model, [data[int(i)] for i in held_out[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--victims", type=int, default=8)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--modes", default="train,eval")
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--jsonl", default=None, help="append one line per attack here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, chosen = victims(args.weights, args.victims)
    names = args.candidates.split(",")
    print("| mode | candidate | PSNR median | PSNR worst | SSIM median | steps | s/attack |")
    print("|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        # Victim by victim, every candidate in turn: a changing load on a shared
        # machine falls on the candidates alike.
        rows: dict[str, list[tuple[float, float, int, float]]] = {name: [] for name in names}
        for v, (image, label) in enumerate(chosen):
            if v < args.first:
                continue
            observation = observe(model, image[None], torch.tensor([label]), batchnorm=mode)
            for name in names:
                config = dataclasses.replace(CANDIDATES[name], snapshot_every=10**9)
                start = time.perf_counter()
                result = InvertingGradients(config)(observation, seed=v)
                seconds = time.perf_counter() - start
                rows[name].append(
                    (psnr(result.inputs[0], image), ssim(result.inputs[0], image),
                     result.steps, seconds)
                )  # fmt: skip
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(
                            f'{{"mode": "{mode}", "candidate": "{name}", "victim": {v}, '
                            f'"psnr": {rows[name][-1][0]:.3f}, "ssim": {rows[name][-1][1]:.4f}, '
                            f'"steps": {result.steps}, "seconds": {seconds:.2f}}}\n'
                        )
        for name in names:
            kept = rows[name]
            p = [r[0] for r in kept]
            print(
                f"| {mode} | {name} | {statistics.median(p):.1f} | {min(p):.1f} | "
                f"{statistics.median(r[1] for r in kept):.2f} | "
                f"{statistics.median(r[2] for r in kept):.0f} | "
                f"{statistics.median(r[3] for r in kept):.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
