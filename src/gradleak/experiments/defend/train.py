"""A defense's cost to the model: train the same LeNet with it, measure test accuracy.

Only test splits exist offline (MNIST's 10,000 images; the first 916 of
CIFAR-100's), so a seeded permutation splits what exists into disjoint
training (80%) and evaluation (20%) parts.  The model is the attacked
architecture, the papers' LeNet with its uniform [-0.5, 0.5] init (Sigmoid
LeNets with PyTorch's small default init or Xavier stayed at chance for a
whole epoch here; the uniform init learns).  Training is FedSGD seen from
the server: every step takes one minibatch of 32 as a client's gradient,
applies the defense to it on the client side, and the server steps with
Adam (lr 1e-2; plain SGD reached under 50% in the same budget).  MNIST
trains for one epoch (250 steps), CIFAR-100 for ten over its 733 images.

Per defense: a transform changes each step's gradient; DP-SGD computes it
with Opacus (per-example clipping and noise), and the caller turns the steps
and sample rate into epsilon (so another delta needs no retraining);
aggregation splits the minibatch into k clients and the server sees the
mean of their (transformed) gradients.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gradleak.data import ImageDataset
from gradleak.defenses import ClientDefense
from gradleak.models import build_model
from gradleak.threat import client_gradients

TRAIN_SHARE = 0.8
BATCH = 32
LR = 1e-2
EPOCHS = {"mnist": 1, "cifar100": 10}
TRAINING = (
    "LeNet (uniform [-0.5, 0.5] init, the papers'), Adam lr 1e-2, minibatch 32, "
    "defense applied to every step's gradient; 80/20 seeded split of the test split"
)


@dataclass(frozen=True)
class Split:
    """The data as tensors, cut into disjoint training and evaluation parts."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor


@dataclass(frozen=True)
class Cost:
    """What training with a defense gave.

    Attributes:
        accuracy: Share of the evaluation part classified right.
        steps: Optimiser steps taken.
        sample_rate: Share of the training part in one minibatch (for DP's epsilon).
        seconds: Wall time of the training and evaluation.
    """

    accuracy: float
    steps: int
    sample_rate: float
    seconds: float


def split_data(data: ImageDataset, seed: int, *, limit: int | None = None) -> Split:
    """Load every image once and split them 80/20 by a seeded permutation.

    `limit` caps the training part (tests use it to stay fast).
    """
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor(data.labels.copy(), dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(TRAIN_SHARE * len(y))
    train, held = order[:cut][:limit], order[cut:]
    return Split(x[train], y[train], x[held], y[held])


def train_with_defense(
    split: Split,
    defense: ClientDefense,
    *,
    dataset: str,
    num_classes: int,
    seed: int,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> Cost:
    """Train LeNet with `defense` on every step's gradient; accuracy on the held-out part.

    Args:
        split: The data.
        defense: Built with its own seed (its noise stream).
        dataset: Picks the number of epochs.
        num_classes: Output size.
        seed: Fixes the init and the minibatch order (equal for every defense).
        device: Where to train.
        progress: Called with (steps done, steps in all).
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    model = build_model(
        "lenet",
        input_shape=tuple(split.train_x.shape[1:]),
        num_classes=num_classes,
        generator=generator,
    ).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=LR)
    epochs = EPOCHS.get(dataset, 1)
    per_epoch = -(-len(split.train_y) // BATCH)
    total, steps = epochs * per_epoch, 0
    for _ in range(epochs):
        order = torch.randperm(len(split.train_y), generator=generator)
        for start in range(0, len(order), BATCH):
            rows = order[start : start + BATCH]
            x, y = split.train_x[rows].to(device), split.train_y[rows].to(device)
            for parameter, g in zip(
                model.parameters(), _server_gradient(model, x, y, defense), strict=True
            ):
                parameter.grad = g
            optimiser.step()
            steps += 1
            if progress is not None:
                progress(steps, total)
    return Cost(
        accuracy=_accuracy(model, split.eval_x, split.eval_y, device),
        steps=steps,
        sample_rate=min(1.0, BATCH / len(split.train_y)),
        seconds=time.perf_counter() - started,
    )


def _server_gradient(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, defense: ClientDefense
) -> tuple[torch.Tensor, ...]:
    """What the server steps with: the mean of the clients' defended gradients."""
    if defense.transform is None and defense.step is None:
        # k equal clients' mean gradients average to the minibatch's: one pass does.
        return client_gradients(model, x, y)
    compute = defense.step or client_gradients
    shared = []
    for xs, ys in zip(
        x.tensor_split(defense.clients), y.tensor_split(defense.clients), strict=True
    ):
        gradients = tuple(compute(model, xs, ys))
        shared.append(defense.transform(gradients) if defense.transform else gradients)
    return tuple(torch.stack(parts).mean(0) for parts in zip(*shared, strict=True))


@torch.no_grad()
def _accuracy(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> float:
    correct = 0
    for start in range(0, len(y), 500):
        logits = model(x[start : start + 500].to(device))
        correct += int((logits.argmax(1).cpu() == y[start : start + 500]).sum())
    return correct / len(y)
