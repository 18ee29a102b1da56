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
from gradleak.models.convnet import CONVNET_WIDTH, MLP, MLP_WIDTH, RESNET18_WIDTH, ConvNet, ResNet18
from gradleak.models.lenet import LeNet, uniform_init_
from gradleak.models.resnet import CifarResNet
from gradleak.models.user import (
    build_user_model,
    fingerprint,
    infer_input_shape,
    is_import_path,
    num_classes_of,
)
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
    "mlp": lambda input_shape, num_classes, generator, width=MLP_WIDTH: MLP(
        input_shape, num_classes, width=width, generator=generator
    ),
}

# The models that take a base width, and their default one.
WIDTHS: dict[str, int] = {"convnet": CONVNET_WIDTH, "resnet18": RESNET18_WIDTH, "mlp": MLP_WIDTH}


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


def resolve_model(
    name: str,
    *,
    input_shape: tuple[int, int, int] | None,
    num_classes: int | None,
    seed: int | None = None,
    width: int | None = None,
    model_args: dict | None = None,
) -> nn.Module:
    """A registry model by name, or the user's own from an import path ``pkg.module:Name``.

    The user's model decides its own input shape and class count: `input_shape`
    is checked against it where given and read from it otherwise
    (`models.user.infer_input_shape`); `num_classes` (the data's) must not
    exceed its outputs.  Either way the model carries a `ModelSpec`, so that
    its weights save and load with a check (the spec's name is the import path).

    Raises:
        ConfigError: An unknown name, a path that does not import, or a model
            that cannot take the data's shape or classes.
    """
    if not is_import_path(name):
        if model_args:
            raise ConfigError("--model-arg is for a model given by import path (pkg.module:Name)")
        if input_shape is None or num_classes is None:
            raise ConfigError(f"model '{name}' needs an input shape and a class count")
        return build_model(
            name, input_shape=input_shape, num_classes=num_classes, seed=seed, width=width
        )
    if width is not None:
        raise ConfigError("--width is for convnet and resnet18; give your model's own arguments "
                          "with --model-arg KEY=VALUE")  # fmt: skip
    model = build_user_model(name, model_args, seed=seed)
    shape = tuple(int(s) for s in input_shape) if input_shape else infer_input_shape(model)
    outputs = num_classes_of(model, shape)
    if num_classes is not None and num_classes > outputs:
        raise ConfigError(
            f"{name} has {outputs} outputs but the data has {num_classes} classes; "
            "give data with at most as many classes, or build the model with more outputs"
        )
    model.gradleak_spec = ModelSpec(name=name, input_shape=shape, num_classes=outputs)
    return model


__all__ = [
    "MODELS",
    "fingerprint",
    "is_import_path",
    "resolve_model",
    "WIDTHS",
    "CifarResNet",
    "ConvNet",
    "LeNet",
    "MLP",
    "ModelSpec",
    "ResNet18",
    "build_model",
    "load_weights",
    "model_spec",
    "read_metadata",
    "save_weights",
    "uniform_init_",
]
