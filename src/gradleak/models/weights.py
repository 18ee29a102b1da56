"""Trained weights in a file that never runs code: safetensors, with what they are.

`save_weights` writes every parameter *and* buffer of a model (BatchNorm's
running statistics and batch counters) to a safetensors file, whose header
also carries a small str -> str metadata table; gradleak stores there which
model the weights belong to (name, width, input shape, class count), how they
were trained and the gradleak version.  Each metadata value is stored as JSON
text (``"convnet"`` with its quotes, ``10``, ``[1, 28, 28]``), so numbers and
lists come back as they went in.

`load_weights` reads the header first and refuses, in one line, weights for
another architecture, width, input shape or class count (`ConfigError`) and a
file that is missing, cut off or not safetensors at all (`DataError`), e.g. a
``torch.save`` checkpoint: those are pickles, and unpickling a file can run
code, so gradleak never calls ``torch.load`` or ``pickle``.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradleak.errors import ConfigError, DataError

# Metadata keys that say which model the weights fit; filled from the model's spec.
SPEC_KEYS = ("model", "width", "input_shape", "num_classes")
# The first bytes of a torch.save file (a zip archive) and of a bare pickle.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"


@dataclass(frozen=True)
class ModelSpec:
    """What `build_model` built: enough to tell whether weights fit it.

    Attributes:
        name: The registry name, e.g. "convnet".
        input_shape: ``(channels, height, width)`` of one example.
        num_classes: Number of output logits.
        width: Base width for models that have one (convnet, resnet18), else None.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    width: int | None = None

    def metadata(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "width": self.width,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
        }


def model_spec(model: nn.Module) -> ModelSpec | None:
    """The spec `build_model` attached to `model` (None for a model built otherwise)."""
    spec = getattr(model, "gradleak_spec", None)
    return spec if isinstance(spec, ModelSpec) else None


def save_weights(model: nn.Module, path: str | os.PathLike[str], metadata: dict[str, Any]) -> Path:
    """Write `model`'s parameters and buffers to the safetensors file `path`.

    The file is written next to its final name and then renamed, so an
    interrupted save never leaves a cut-off file under that name.

    Args:
        model: Usually built by `build_model` (its name, width, input shape and
            class count go into the metadata); a model built otherwise needs
            at least "model" and "num_classes" in `metadata`.
        path: The file to write (its folder must exist).
        metadata: JSON-serialisable values (how the weights were trained, their
            test accuracy, ...); stored as JSON text in the header.

    Returns:
        The path written.

    Raises:
        ValueError: `metadata` contradicts the model's spec, lacks the model's
            name or class count, or holds a value JSON cannot store.
        ConfigError: The file cannot be written.
    """
    from safetensors.torch import save

    import gradleak

    header: dict[str, Any] = dict(metadata)
    spec = model_spec(model)
    if spec is not None:
        for key, value in spec.metadata().items():
            if key in header and header[key] != value:
                raise ValueError(
                    f"metadata[{key!r}] is {header[key]!r}, but the model has {value!r}"
                )
            header[key] = value
    missing = [key for key in ("model", "num_classes") if key not in header]
    if missing:
        raise ValueError(f"metadata must name the model's {' and '.join(missing)}")
    header.setdefault("gradleak_version", gradleak.__version__)
    try:
        encoded = {str(key): json.dumps(value) for key, value in header.items()}
    except TypeError as error:
        raise ValueError(f"metadata values must be JSON-serialisable: {error}") from None
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    target = Path(path).expanduser()
    temporary = str(target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.partial"))
    data = save(tensors, metadata=encoded)
    try:
        # Written here rather than by save_file, so the file gets the usual permissions
        # (the umask's, not a temporary file's 0600).
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"cannot write the weights file {path} ({reason})") from None
    return target


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a weights file, decoded, without loading any tensor.

    Raises:
        DataError: The file is missing, cut off or not a safetensors file.
    """
    metadata, _ = _read(path, tensors=False)
    return metadata


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load the weights file `path` into `model` (parameters and buffers), in place.

    Returns:
        The file's metadata, decoded (see `save_weights`).

    Raises:
        ConfigError: The file holds weights for another model, width, input
            shape or class count, or tensors that do not fit `model`.
        DataError: The file is missing, cut off or not a safetensors file.
    """
    metadata, tensors = _read(path, tensors=True)
    spec = model_spec(model)
    if spec is not None and "model" in metadata:
        held = {key: metadata.get(key) for key in SPEC_KEYS}
        wanted = spec.metadata()
        if held != wanted:
            raise ConfigError(
                f"{path} holds {_describe(held)}; this run builds {_describe(wanted)}: "
                "give weights trained for this model, or build the model they hold"
            )
    what = f"a {metadata['model']}" if "model" in metadata else "weights"
    expected = model.state_dict()
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    if missing or unexpected:
        detail = f"it lacks {missing[0]}" if missing else f"it has {unexpected[0]} in addition"
        raise ConfigError(
            f"{path} holds {what} whose tensors do not fit this model ({detail}; "
            f"{len(missing)} missing, {len(unexpected)} extra)"
        )
    for name, tensor in expected.items():
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            raise ConfigError(
                f"{path} holds {what} whose tensors do not fit this model ({name} is "
                f"{_shape(tensors[name])} there, {_shape(tensor)} here)"
            )
    model.load_state_dict(tensors, strict=True)
    return metadata


def _read(
    path: str | os.PathLike[str], *, tensors: bool
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Decoded metadata and (if asked) the tensors of a safetensors file."""
    from safetensors import SafetensorError, safe_open

    file = Path(path).expanduser()
    if not file.exists():
        raise DataError(f"weights file {path} not found")
    if not file.is_file():
        raise DataError(f"{path} is not a file: give a .safetensors weights file")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as weights:
            raw = weights.metadata() or {}
            names = weights.keys() if tensors else []
            loaded = {name: weights.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError) as error:
        raise DataError(_unreadable(file, path, error)) from None
    return {key: _decode(value) for key, value in raw.items()}, loaded


def _unreadable(file: Path, path: str | os.PathLike[str], error: Exception) -> str:
    """One line on why `file` is not a readable safetensors file."""
    try:
        with file.open("rb") as handle:
            start = handle.read(4)
    except OSError:
        start = b""
    if start.startswith(_ZIP_MAGIC) or start.startswith(_PICKLE_MAGIC):
        return (
            f"{path} is a PyTorch pickle (torch.save), not a safetensors file: gradleak never "
            "unpickles weights (that can run code); save them with gradleak.models.save_weights "
            "or safetensors.torch.save_file"
        )
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{path} is cut off or not a safetensors weights file ({reason})"


def _decode(value: str) -> Any:
    # gradleak writes JSON text; another tool's plain strings come back as they are.
    try:
        return json.loads(value)
    except ValueError:
        return value


def _describe(spec: dict[str, Any]) -> str:
    """E.g. "a convnet (width 32) for 10 classes on 1x28x28 images"."""
    name = spec.get("model")
    width = f" (width {spec['width']})" if spec.get("width") is not None else ""
    shape = spec.get("input_shape")
    on = f" on {'x'.join(str(s) for s in shape)} images" if isinstance(shape, list) else ""
    return f"a {name}{width} for {spec.get('num_classes')} classes{on}"


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(str(s) for s in tensor.shape) or "a scalar"
