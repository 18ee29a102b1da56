"""Models the papers attack, built by name from a small registry."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gradleak.errors import ConfigError
from gradleak.models.lenet import LeNet, uniform_init_
from gradleak.models.resnet import CifarResNet

ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, ModelFactory] = {
    "lenet": lambda input_shape, num_classes, generator: LeNet(
        input_shape, num_classes, generator=generator
    ),
    "lenet-dlg": lambda input_shape, num_classes, generator: LeNet(
        input_shape, num_classes, strides=(1, 1, 1), generator=generator
    ),
    "resnet20": lambda input_shape, num_classes, generator: CifarResNet(
        20, input_shape, num_classes, generator=generator
    ),
    "resnet56": lambda input_shape, num_classes, generator: CifarResNet(
        56, input_shape, num_classes, generator=generator
    ),
}


def build_model(
    name: str,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Build a fresh, randomly initialised model by name.

    Args:
        name: One of `MODELS` ("lenet", "lenet-dlg", "resnet20", "resnet56").
        input_shape: ``(channels, height, width)`` of one example.
        num_classes: Number of output logits.
        seed: Seed for the init; ignored when `generator` is given.
        generator: Source of randomness for the init.
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}': choose one of {', '.join(MODELS)}")
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    return MODELS[name](tuple(input_shape), num_classes, generator)


__all__ = ["MODELS", "CifarResNet", "LeNet", "build_model", "uniform_init_"]
