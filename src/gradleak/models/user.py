"""The user's own model: an import path ``package.module:Name``, and its fingerprint.

A real federated app defines its model in its own module (Flower's
quickstart has ``Net`` in ``task.py``).  gradleak builds it from an import
path, ``package.module:Name``, where ``Name`` is an ``nn.Module`` subclass or
a function returning one, called with the keyword arguments the user gives.

Importing a module runs its code.  So gradleak imports only what the user
names on its own command line (or passes as an object in Python), never a
path read from a capture or a weights file: those record the path and a
*fingerprint* of the architecture (every parameter's and buffer's name,
shape and dtype, hashed), and the model the user gives is checked against it.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from gradleak.errors import ConfigError

__all__ = [
    "Normalization",
    "normalization_of",
    "normalize_input",
    "parse_normalization",
    "architecture",
    "fingerprint",
    "import_path",
    "is_import_path",
    "load_factory",
    "build_user_model",
    "infer_input_shape",
    "num_classes_of",
    "parse_model_args",
]

_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_import_path(name: str) -> bool:
    """Whether `name` is an import path ``package.module:Name`` rather than a registry name."""
    return ":" in name


def load_factory(path: str) -> Callable[..., Any]:
    """Import ``package.module:Name`` and return ``Name`` (a class or a function).

    The current folder is searched first, as ``python -m`` does, so that a
    user in their app's folder can name ``app.task:Net``.

    Raises:
        ConfigError: A malformed path, a module that does not import (its
            first error line is quoted), or no such name in it.
    """
    if not _PATH.match(path):
        raise ConfigError(
            f"'{path}' is not an import path: write package.module:Name, e.g. app.task:Net"
        )
    module_name, attribute = path.split(":", 1)
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ConfigError(
            f"cannot import '{module_name}' for --model {path} ({error}); run gradleak from the "
            "folder that holds it, or add that folder to PYTHONPATH"
        ) from None
    except Exception as error:  # the user's module failed while it ran
        first = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"importing '{module_name}' for --model {path} failed: {type(error).__name__}: {first}"
        ) from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"module '{module_name}' has no '{attribute}' (from --model {path})")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"'{path}' is a {type(target).__name__}, not a class or function")
    return target


def build_user_model(
    path: str, kwargs: Mapping[str, Any] | None = None, *, seed: int | None = None
) -> nn.Module:
    """Build the user's model from its import path, with torch's global RNG seeded.

    The user's initialisation draws from torch's global generator; with
    `seed` it is seeded inside a fork of the RNG state, so the caller's global
    state is left as it was and equal seeds give equal weights.

    Raises:
        ConfigError: The path does not import, the call fails or returns
            something that is not an ``nn.Module``.
    """
    factory = load_factory(path)
    kwargs = dict(kwargs or {})
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(int(seed))
        try:
            model = factory(**kwargs)
        except TypeError as error:
            detail = _signature(factory)
            raise ConfigError(
                f"{path}({_show(kwargs)}) failed: {error}; its arguments are {detail} "
                "(give them with --model-arg KEY=VALUE)"
            ) from None
        except Exception as error:
            first = (str(error).strip().splitlines() or [""])[0]
            raise ConfigError(
                f"{path}({_show(kwargs)}) failed: {type(error).__name__}: {first}"
            ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{path}({_show(kwargs)}) returned a {type(model).__name__}, not a torch nn.Module"
        )
    return model


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``["width=32", "name=\\"x\\""]`` -> ``{"width": 32, "name": "x"}`` (JSON values, else text).

    Raises:
        ConfigError: An item without ``=`` or with an empty key.
    """
    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"--model-arg takes KEY=VALUE, got '{item}'")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        result[key.strip()] = value
    return result


def architecture(model: nn.Module) -> list[list[Any]]:
    """``[name, shape, dtype]`` of every parameter and buffer, in ``state_dict`` order."""
    return [
        [name, list(tensor.shape), str(tensor.dtype).removeprefix("torch.")]
        for name, tensor in model.state_dict().items()
    ]


def fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` of `architecture`: equal for models whose weights load into each other."""
    text = json.dumps(architecture(model), separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def import_path(model: nn.Module) -> str:
    """The import path of the model's class, ``module:QualName``."""
    kind = type(model)
    return f"{kind.__module__}:{kind.__qualname__}"


def num_classes_of(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> int:
    """The model's number of outputs: its last Linear's, else the output of a probe."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return int(linears[-1].out_features)
    if input_shape is None:
        raise ConfigError("cannot tell the model's class count: it has no Linear layer")
    return int(_run(model, input_shape).shape[-1])


# Square sizes tried, most common first, when the user gives no input shape.
_SIZES = (32, 28, 64, 224, 16, 96, 128, 256, 48, 112, 160, 192)


def infer_input_shape(model: nn.Module) -> tuple[int, int, int]:
    """The ``(channels, height, width)`` the model takes, read from it where it can be.

    The channels are the first convolution's; the size is the first square
    one of common sizes that the model runs on.  A model whose first layer is
    Linear (a flattened input) cannot say its shape.

    Raises:
        ConfigError: No size fits, or the model starts with no convolution.
    """
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)), None)
    if not isinstance(first, nn.Conv2d):
        raise ConfigError(
            "cannot read the input shape from a model that does not start with a Conv2d; "
            "give it with --input-shape C,H,W"
        )
    for size in _SIZES:
        shape = (int(first.in_channels), size, size)
        try:
            _run(model, shape)
        except Exception:  # this size does not fit; try the next
            continue
        return shape
    raise ConfigError(
        "cannot find an input size the model runs on; give it with --input-shape C,H,W"
    )


def _run(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    training = [(m, m.training) for m in model.modules()]
    weight = next(iter(model.parameters()), None)
    dtype = weight.dtype if weight is not None else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            return model(torch.zeros(1, *shape, dtype=dtype))
    finally:
        for module, mode in training:
            module.training = mode


def _signature(factory: Callable[..., Any]) -> str:
    try:
        return str(inspect.signature(factory))
    except (TypeError, ValueError):
        return "unknown"


def _show(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


# --- the input domain -------------------------------------------------------------------------


class Normalization:
    """``(x - mean) / std`` per channel: what the user's data pipeline does before the model.

    Attacks optimise pixels in [0, 1] and the model sees them normalised, as
    the client's model saw its data; metrics and pictures stay in pixel space.
    Applied as a forward pre-hook (`normalize_input`), so the model keeps its
    class, parameter names and state_dict, and every copy of it (the
    attacker's replicas are deep copies) normalises too.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        if len(mean) != len(std) or not mean:
            raise ConfigError("give one mean and one std per channel (or one of each for all)")
        if any(not math.isfinite(v) for v in (*mean, *std)):
            raise ConfigError("the normalisation's mean and std must be finite numbers")
        if any(s <= 0 for s in std):
            raise ConfigError(f"a normalisation std must be above 0, got {list(std)}")
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(shape)
        return ((x - mean) / std, *args[1:])

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    def __repr__(self) -> str:
        return f"Normalization(mean={list(self.mean)}, std={list(self.std)})"


def parse_normalization(text: str, channels: int) -> Normalization:
    """``"0.5,0.5"`` (one mean and std for every channel) or ``"m1,m2,m3,s1,s2,s3"``.

    Raises:
        ConfigError: Not numbers, a count that is neither 2 nor twice the
            channels, or a std of 0.
    """
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(
            f"--normalize takes numbers MEAN,STD (or C means then C stds), got '{text}'"
        ) from None
    if len(values) == 2:
        return Normalization((values[0],) * channels, (values[1],) * channels)
    if len(values) == 2 * channels:
        return Normalization(tuple(values[:channels]), tuple(values[channels:]))
    raise ConfigError(
        f"--normalize got {len(values)} numbers for {channels}-channel images: give MEAN,STD "
        f"or {channels} means then {channels} stds"
    )


def normalize_input(model: nn.Module, normalization: Normalization | None) -> nn.Module:
    """Make `model` normalise its input first (in place; returned for chaining).

    Raises:
        ConfigError: The model normalises already, or the channel counts differ.
    """
    if normalization is None:
        return model
    if getattr(model, "gradleak_normalize", None) is not None:
        raise ConfigError("the model normalises its input already")
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and first.in_channels != len(normalization.mean):
        raise ConfigError(
            f"the normalisation has {len(normalization.mean)} channels, the model's first "
            f"convolution takes {first.in_channels}"
        )
    model.register_forward_pre_hook(normalization)
    model.gradleak_normalize = normalization
    return model


def normalization_of(model: nn.Module) -> Normalization | None:
    """The normalisation `normalize_input` gave the model, or None."""
    value = getattr(model, "gradleak_normalize", None)
    return value if isinstance(value, Normalization) else None
