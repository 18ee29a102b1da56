"""`gradleak train`: train a model people use on the data at hand; write its weights.

Attacks on a model at its random init say little about a model in
deployment; this command trains one (`convnet`, `resnet18`, or any model of
the registry) so that later attacks can load its weights.

Data: only the test splits exist offline (MNIST's 10,000 images; 916 of
CIFAR-100's), so, as `gradleak defend` does, a seeded permutation splits the
images at hand 80/20 into disjoint training and test parts (without
``limit`` it is the very split `defend` uses for the same seed; ``limit``
keeps the first N images of the permutation before the cut).  Inputs are the
readers' pixels in [0, 1], not normalised.

Training: Adam (lr 1e-3, minibatch 64 by default), cross-entropy, BatchNorm
in training mode for every step and in eval mode (running statistics) for the
test accuracy.  A last minibatch of a single image is skipped: BatchNorm
cannot normalise over one example.  One user seed fixes the split; seeds
derived from it fix the init and the minibatch order.

Output: one safetensors file with every parameter and buffer and, in its
header, what the weights are and how they were trained (`TrainResult.metadata`;
see `gradleak.models.weights`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import gradleak
from gradleak.data import FULL_SIZES, ImageDataset, load_dataset
from gradleak.errors import ConfigError
from gradleak.experiments.common import (
    DATASET_NAMES,
    derive_seeds,
    resolve_device,
    use_cpu_threads,
)
from gradleak.models import MODELS, WIDTHS, build_model, is_import_path, resolve_model, save_weights
from gradleak.models.user import normalize_input, parse_model_args, parse_normalization
from gradleak.outdir import prepare_out

DATASETS = ("mnist", "cifar10", "cifar100", "svhn")
SPLIT = "test"  # the split gradleak reads: the data at hand
TRAIN_SHARE = 0.8
OPTIMISER = "Adam"
LR = 1e-3
BATCH = 64
EVAL_BATCH = 500
INPUTS = "pixels in [0, 1], (C, H, W), not normalised"

# callback(stage, done, total): stage "train" counts optimiser steps, "test" test images.
ProgressCallback = Callable[[str, float, int], None]


@dataclass(frozen=True)
class TrainRun:
    """One `gradleak train` invocation.

    Attributes:
        model: A name of `gradleak.models.MODELS`, e.g. "convnet" or "resnet18".
        dataset: "mnist", "cifar10", "cifar100" or "svhn" (its test split).
        out: The weights file to write (its folder is created).
        epochs: Passes over the training part.
        data_dir: Folder with the dataset's files (None: the default).
        width: Base width of convnet/resnet18 (None: the model's default).
        lr: Adam's learning rate.
        batch_size: Minibatch size (2 or more: BatchNorm).
        seed: Fixes the split, the init and the minibatch order.
        device: "auto", "cpu" or "cuda".
        limit: Use only this many images of the seeded permutation (None: all).
        command: The command line, kept in the metadata.
        model_args: ``KEY=VALUE`` arguments of a model given by import path.
        input_shape: The input shape of such a model (None: read from it); the
            data is fitted to it.
        normalize: ``MEAN,STD`` the model's input is normalised with, as the
            user's pipeline does.
    """

    model: str = "convnet"
    dataset: str = "mnist"
    out: str = "weights.safetensors"
    epochs: int = 1
    data_dir: str | None = None
    width: int | None = None
    lr: float = LR
    batch_size: int = BATCH
    seed: int = 0
    device: str = "auto"
    limit: int | None = None
    command: str = ""
    model_args: tuple[str, ...] = ()
    input_shape: tuple[int, int, int] | None = None
    normalize: str | None = None

    def __post_init__(self) -> None:
        if not is_import_path(self.model) and self.model not in MODELS:
            raise ConfigError(
                f"unknown model '{self.model}': choose one of {', '.join(MODELS)}, "
                "or give your own as package.module:Name"
            )
        if self.width is not None and self.model not in WIDTHS:
            raise ConfigError(
                f"model '{self.model}' has no width: --width applies to {' and '.join(WIDTHS)}"
            )
        if self.width is not None and self.width < 1:
            raise ConfigError(f"--width must be 1 or more, got {self.width}")
        if self.dataset not in DATASETS and not Path(self.dataset).expanduser().is_dir():
            raise ConfigError(
                f"unknown dataset '{self.dataset}': choose one of {', '.join(DATASETS)}, "
                "or give a folder of class subfolders of images"
            )
        if self.epochs < 1:
            raise ConfigError(f"--epochs must be 1 or more, got {self.epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a number above 0, got {self.lr:g}")
        if self.batch_size < 2:
            raise ConfigError(
                f"--batch-size must be 2 or more (BatchNorm needs two images), got "
                f"{self.batch_size}"
            )
        if self.seed < 0:
            raise ConfigError(f"--seed must be 0 or more, got {self.seed}")
        if self.limit is not None and self.limit < 2:
            raise ConfigError(
                f"--limit must be 2 or more (one image to train on, one to test), got {self.limit}"
            )


@dataclass(frozen=True)
class TrainResult:
    """What a training run reached and wrote.

    Attributes:
        path: The weights file.
        metadata: What the file's header holds (decoded), test accuracy included.
        summary: One line for the terminal.
    """

    path: Path
    metadata: dict[str, Any]
    summary: str

    @property
    def accuracy(self) -> float:
        return float(self.metadata["test_accuracy"])


def check_weights_path(out: str) -> Path:
    """Refuse an ``--out`` that is a folder or lies inside a file; create its folder.

    Raises:
        ConfigError: With one line saying what to give instead.
    """
    target = Path(out).expanduser()
    if target.is_dir() or out.endswith(("/", "\\")):
        raise ConfigError(
            f"--out {out} is a folder: give the weights file's name, e.g. "
            f"{Path(out) / 'weights.safetensors'}"
        )
    inside = next((parent for parent in target.parents if parent.exists()), None)
    if inside is not None and not inside.is_dir():
        raise ConfigError(f"--out {out} is inside the file {inside}; give a file name in a folder")
    prepare_out(target.parent)
    return target


def split_indices(
    size: int, seed: int, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training (80%) and test (20%) parts of `size` images.

    A seeded permutation, cut after 80% (`gradleak defend`'s split); `limit`
    keeps only its first `limit` images before the cut.
    """
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    if limit is not None:
        order = order[:limit]
    cut = int(TRAIN_SHARE * len(order))
    return order[:cut], order[cut:]


def source_text(dataset: str, size: int, used: int) -> str:
    """The images split 80/20: "the MNIST test split", "300 of the 10,000 MNIST test images"."""
    name = DATASET_NAMES.get(dataset, dataset)
    full = FULL_SIZES.get(dataset)
    if used < size:
        return f"{used:,} of the {size:,} {name} {SPLIT} images"
    if full is not None and size < full:
        return f"the {size:,} of {full:,} {name} {SPLIT} images at hand"
    return f"the {name} {SPLIT} split"


def describe_split(dataset: str, size: int, used: int, train: int, test: int, seed: int) -> str:
    """What the metadata says of the split, e.g. "80/20 seeded split (seed 0) of the MNIST ..."."""
    return (
        f"80/20 seeded split (seed {seed}) of {source_text(dataset, size, used)} (only the "
        f"{SPLIT} split is at hand): {train:,} training images, the other {test:,} for testing"
    )


def _tensors(data: ImageDataset, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([data[int(i)][0] for i in rows])
    y = torch.tensor(data.labels[rows.numpy()], dtype=torch.long)
    return x, y


def run_train(run: TrainRun, *, callback: ProgressCallback | None = None) -> TrainResult:
    """Train `run.model` on the data at hand, write its weights file, return what it reached.

    Raises:
        ConfigError: Bad settings, an unusable ``out``, or training that diverged.
        DataError: The dataset's files are missing or corrupt.
    """
    started = time.perf_counter()
    device = resolve_device(run.device)
    target = check_weights_path(run.out)
    use_cpu_threads(device)  # one thread unless OMP_NUM_THREADS says otherwise
    init_seed, order_seed = derive_seeds(run.seed, 2)
    shape = run.input_shape
    user = None
    if is_import_path(run.model):
        user = resolve_model(
            run.model, input_shape=shape, num_classes=None, seed=init_seed,
            model_args=parse_model_args(list(run.model_args)),
        )  # fmt: skip
        shape = user.gradleak_spec.input_shape
    data = load_dataset(run.dataset, data_dir=run.data_dir, split=SPLIT, download=None, shape=shape)
    train_rows, test_rows = split_indices(len(data), run.seed, run.limit)
    model = user or build_model(
        run.model,
        input_shape=data.shape,
        num_classes=data.num_classes,
        seed=init_seed,
        width=run.width,
    )
    if user is not None and data.num_classes > user.gradleak_spec.num_classes:
        raise ConfigError(
            f"{run.model} has {user.gradleak_spec.num_classes} outputs, {run.dataset} "
            f"{data.num_classes} classes: give a model with as many outputs"
        )
    if run.normalize is not None:
        normalize_input(model, parse_normalization(run.normalize, data.shape[0]))
    model = model.to(device)
    train_x, train_y = _tensors(data, train_rows)
    test_x, test_y = _tensors(data, test_rows)

    optimiser = torch.optim.Adam(model.parameters(), lr=run.lr)
    order_generator = torch.Generator().manual_seed(order_seed)
    batches = [
        (start, min(start + run.batch_size, len(train_y)))
        for start in range(0, len(train_y), run.batch_size)
    ]
    batches = [(a, b) for a, b in batches if b - a >= 2]  # BatchNorm needs two images
    if not batches:
        raise ConfigError(
            f"the training part has {len(train_y)} image(s): BatchNorm needs two; raise --limit"
        )
    total, steps = run.epochs * len(batches), 0
    epoch_loss = math.nan
    for _ in range(run.epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=order_generator)
        loss_sum, seen = 0.0, 0
        for a, b in batches:
            rows = order[a:b]
            x, y = train_x[rows].to(device), train_y[rows].to(device)
            loss = F.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"training diverged at step {steps + 1} (loss {float(loss)}): lower --lr "
                    f"(it is {run.lr:g})"
                )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            loss_sum += loss.item() * len(rows)
            seen += len(rows)
            steps += 1
            if callback is not None:
                callback("train", steps, total)
        epoch_loss = loss_sum / seen
    correct = _correct(model, test_x, test_y, device, callback)
    accuracy = correct / len(test_y)
    seconds = time.perf_counter() - started

    spec = model.gradleak_spec
    parameters = sum(p.numel() for p in model.parameters())
    used = len(train_rows) + len(test_rows)
    split = describe_split(run.dataset, len(data), used, len(train_rows), len(test_rows), run.seed)
    metadata: dict[str, Any] = {
        **spec.metadata(),
        "parameters": parameters,
        "dataset": run.dataset,
        "dataset_split": SPLIT,
        "dataset_size": len(data),
        "split": split,
        "split_seed": run.seed,
        "train_share": TRAIN_SHARE,
        "limit": run.limit,
        "train_images": len(train_rows),
        "test_images": len(test_rows),
        "inputs": INPUTS,
        "epochs": run.epochs,
        "steps": steps,
        "optimizer": OPTIMISER,
        "lr": run.lr,
        "batch_size": run.batch_size,
        "seed": run.seed,
        "init_seed": init_seed,
        "order_seed": order_seed,
        "train_loss": epoch_loss,
        "test_correct": correct,
        "test_accuracy": accuracy,
        "device": device.type,
        "seconds": round(seconds, 1),
        "torch_version": torch.__version__,
        "gradleak_version": gradleak.__version__,
        "command": run.command,
    }
    save_weights(model.cpu(), target, metadata)
    width = f"width {spec.width}, " if spec.width is not None else ""
    epochs = f"{run.epochs} epoch{'s' if run.epochs != 1 else ''}"
    summary = (
        f"trained {run.model} ({width}{parameters:,} parameters) for {epochs} ({steps} "
        f"step{'s' if steps != 1 else ''}, "
        f"{OPTIMISER} lr {run.lr:g}, batch {run.batch_size}) on 80% of "
        f"{source_text(run.dataset, len(data), used)} ({len(train_rows):,} images; only the "
        f"{SPLIT} split is at hand), tested on the other 20%: test accuracy "
        f"{100 * accuracy:.2f}% ({correct:,} of {len(test_y):,} right); wrote {run.out} "
        f"({seconds:.0f} s)"
    )
    return TrainResult(path=target, metadata=metadata, summary=summary)


@torch.no_grad()
def _correct(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    callback: ProgressCallback | None,
) -> int:
    """Test images classified right, BatchNorm in eval mode (running statistics)."""
    model.eval()
    correct = 0
    for start in range(0, len(y), EVAL_BATCH):
        logits = model(x[start : start + EVAL_BATCH].to(device))
        correct += int((logits.argmax(1).cpu() == y[start : start + EVAL_BATCH]).sum())
        if callback is not None:
            callback("test", min(start + EVAL_BATCH, len(y)), len(y))
    return correct
