"""Models the papers attack and models people train, built by name from a small registry.

The papers' models (`lenet`, `lenet-dlg`, `resnet20`, `resnet56`) are Sigmoid
networks attacked at their random init; `convnet` and `resnet18` are the ReLU
and BatchNorm networks federated learning trains (see `convnet.py`), and they
take a base ``width``.  Trained weights are kept in safetensors files
(`save_weights`, `load_weights`; see `weights.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gradleak.errors import ConfigError
from gradleak.models.convnet import CONVNET_WIDTH, RESNET18_WIDTH, ConvNet, ResNet18
from gradleak.models.lenet import LeNet, uniform_init_
from gradleak.models.resnet import CifarResNet
from gradleak.models.weights import ModelSpec, load_weights, model_spec, read_metadata, save_weights

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
    "convnet": lambda input_shape, num_classes, generator, width=CONVNET_WIDTH: ConvNet(
        input_shape, num_classes, width=width, generator=generator
    ),
    "resnet18": lambda input_shape, num_classes, generator, width=RESNET18_WIDTH: ResNet18(
        input_shape, num_classes, width=width, generator=generator
    ),
}

# The models that take a base width, and their default one.
WIDTHS: dict[str, int] = {"convnet": CONVNET_WIDTH, "resnet18": RESNET18_WIDTH}


def build_model(
    name: str,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    width: int | None = None,
) -> nn.Module:
    """Build a fresh, randomly initialised model by name.

    The model carries a `ModelSpec` (``model.gradleak_spec``: name, input
    shape, class count, width) that `save_weights` records and `load_weights`
    checks.

    Args:
        name: One of `MODELS` ("lenet", "lenet-dlg", "resnet20", "resnet56",
            "convnet", "resnet18").
        input_shape: ``(channels, height, width)`` of one example.
        num_classes: Number of output logits.
        seed: Seed for the init; ignored when `generator` is given.
        generator: Source of randomness for the init.
        width: Base width of "convnet" (default 32) or "resnet18" (default 64);
            None: the default. The papers' models have no width.

    Raises:
        ConfigError: An unknown name, a width for a model without one, or a
            width or input shape the model cannot take.
    """
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}': choose one of {', '.join(MODELS)}")
    options = {}
    if width is not None:
        if name not in WIDTHS:
            raise ConfigError(
                f"model '{name}' has no width: --width applies to {' and '.join(WIDTHS)}"
            )
        if width < 1:
            raise ConfigError(f"the width must be 1 or more, got {width}")
        options["width"] = int(width)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    shape = tuple(int(s) for s in input_shape)
    model = MODELS[name](shape, num_classes, generator, **options)
    model.gradleak_spec = ModelSpec(
        name=name,
        input_shape=shape,
        num_classes=int(num_classes),
        width=options.get("width", WIDTHS.get(name)),
    )
    return model


__all__ = [
    "MODELS",
    "WIDTHS",
    "CifarResNet",
    "ConvNet",
    "LeNet",
    "ModelSpec",
    "ResNet18",
    "build_model",
    "load_weights",
    "model_spec",
    "read_metadata",
    "save_weights",
    "uniform_init_",
]
