"""The batch label rule against the fitted-logits check, on the same seeded batches.

For each batch size, draws `--batches` batches of held-out images (the split
`gradleak train` keeps out, seeded), lets the client take one step (FedSGD,
`--batchnorm` mode) and counts how often each way reads the batch's label
multiset exactly: the rule alone (`batch_labels(obs)`) and the rule checked by
fitting the examples' logits (`batch_labels(obs, fit_logits=True)`, what
Inverting Gradients uses).  Also the fit's seconds per batch.

    python bench/labels.py --weights W --dataset mnist --data-dir ../shared/data \\
        --batch-sizes 2,4,8 --batchnorm eval --batches 20

`--weights lenet` uses iDLG's untrained LeNet instead (a fresh seeded model).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from gradleak import build_model, observe
from gradleak.attacks.labels import batch_labels
from gradleak.data import load_dataset
from gradleak.experiments.train.run import split_indices
from gradleak.models.weights import load_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="a trained ConvNet, or 'lenet'")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--batch-sizes", default="2,4,8")
    parser.add_argument("--batchnorm", default="eval", choices=("eval", "train"))
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset(args.dataset, data_dir=Path(args.data_dir), download=False)
    _, held = split_indices(len(data), 0)
    name = "lenet" if args.weights == "lenet" else "convnet"
    model = build_model(name, input_shape=data.shape, num_classes=data.num_classes, seed=0)
    if name == "convnet":
        load_weights(model, args.weights)
    print("| B | BatchNorm | rule exact | fitted exact | fit s a batch |")
    print("|---|---|---|---|---|")
    for size in (int(s) for s in args.batch_sizes.split(",")):
        draw = np.random.default_rng(size)
        rule = fitted = 0
        seconds = 0.0
        for _ in range(args.batches):
            chosen = draw.choice(held, size, replace=False)
            x = torch.stack([data[int(i)][0] for i in chosen])
            y = torch.tensor([data[int(i)][1] for i in chosen])
            observation = observe(model, x, y, batchnorm=args.batchnorm)
            truth = y.sort().values.tolist()
            rule += batch_labels(observation).tolist() == truth
            start = time.perf_counter()
            fitted += batch_labels(observation, fit_logits=True).tolist() == truth
            seconds += time.perf_counter() - start
        n = args.batches
        print(f"| {size} | {args.batchnorm} | {rule}/{n} | {fitted}/{n} | {seconds / n:.1f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
