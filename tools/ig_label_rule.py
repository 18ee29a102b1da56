"""Measure the label rule that Inverting Gradients uses on FedAvg updates.

For each row: `batches` seeded batches of 4 real test images (distinct labels,
or labels of which at least one repeats), a fresh untrained model per batch
(seeded per batch, the registry's init), the client's round simulated by
`gradleak.threat.observe_update`, and the labels read by
`gradleak.attacks.inverting.update_labels` from ``-update / (lr * K)``.  A
batch counts when the recovered label multiset equals the true one.

Schedules: "K=1 whole batch" (one step on the 4 images: the FedSGD gradient
times -lr) and "2 epochs of b=2" (4 steps of mini-batches of 2 over the 4
images, shuffled by the client's seed).

Usage:
    python tools/ig_label_rule.py [--batches 50] [--lr 0.001 0.01 0.1] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from gradleak import build_model, observe_update
from gradleak.attacks.inverting import update_labels
from gradleak.data import load_dataset
from gradleak.data.dataset import ImageDataset

BATCH = 4
SCHEDULES = {
    "K=1 whole batch": {"local_steps": 1, "local_batch": None},
    "2 epochs of b=2": {"epochs": 2, "local_batch": 2},
}
# (model, width or None, dataset): the papers' Sigmoid LeNet and ResNet-20, and the
# ReLU + BatchNorm ConvNet that Inverting Gradients' peers benchmark (at width 16).
ROWS = (
    ("lenet", None, "mnist"),
    ("lenet", None, "cifar100"),
    ("resnet20", None, "cifar100"),
    ("convnet", 16, "cifar100"),
)


def random_batch(
    dataset: ImageDataset, size: int, *, repeated: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct labels, or k in 1..size-1 classes with the other examples drawn from them."""
    classes = torch.randperm(dataset.num_classes, generator=generator)
    if repeated:
        k = int(torch.randint(1, size, (1,), generator=generator))
        extra = torch.randint(k, (size - k,), generator=generator)
        labels = torch.cat([classes[:k], classes[extra]])
    else:
        labels = classes[:size]
    pool = torch.from_numpy(dataset.labels.copy())
    indices = []
    for label in labels.tolist():
        candidates = (pool == label).nonzero().flatten()
        indices.append(int(candidates[torch.randint(len(candidates), (1,), generator=generator)]))
    return torch.stack([dataset[i][0] for i in indices]), labels


def exact_share(
    model_name: str,
    width: int | None,
    dataset: ImageDataset,
    *,
    repeated: bool,
    schedule: dict,
    lr: float,
    batches: int,
    seed: int,
) -> float:
    """Share of seeded batches whose label multiset the update rule gets exactly."""
    generator = torch.Generator().manual_seed(seed)
    right = 0
    for b in range(batches):
        x, y = random_batch(dataset, BATCH, repeated=repeated, generator=generator)
        model = build_model(
            model_name,
            input_shape=dataset.shape,
            num_classes=dataset.num_classes,
            seed=seed + b,
            width=width,
        )
        observation = observe_update(model, x, y, local_lr=lr, seed=b, **schedule)
        right += update_labels(observation).tolist() == sorted(y.tolist())
    return right / batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--lr", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    default = os.environ.get("GRADLEAK_DATA") or Path(__file__).resolve().parents[2] / "shared/data"
    parser.add_argument("--data-dir", default=str(default))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # One whole-batch step reads -lr times the exact gradient: the lr cannot matter beyond
    # rounding, so that schedule runs at the largest lr only.
    columns = [("K=1 whole batch", max(args.lr))] + [("2 epochs of b=2", lr) for lr in args.lr]
    heads = [f"{name}, lr {lr:g}" for name, lr in columns]
    print(f"| model | data | labels | {' | '.join(heads)} |")
    print("|---|---|---|" + "---|" * len(columns))
    for model_name, width, data_name in ROWS:
        dataset = load_dataset(data_name, data_dir=args.data_dir, download=False)
        label = model_name if width is None else f"{model_name} (width {width})"
        for repeated in (False, True):
            start = time.perf_counter()
            cells = []
            for name, lr in columns:
                share = exact_share(
                    model_name,
                    width,
                    dataset,
                    repeated=repeated,
                    schedule=SCHEDULES[name],
                    lr=lr,
                    batches=args.batches,
                    seed=1000 * repeated + 7,
                )
                cells.append(f"{round(share * args.batches)}/{args.batches}")
            kind = "repeated" if repeated else "distinct"
            print(
                f"| {label} | {data_name} | {kind} | {' | '.join(cells)} |"
                f"  ({time.perf_counter() - start:.0f} s)",
                file=sys.stdout,
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
