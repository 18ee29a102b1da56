"""Reading single image files with Pillow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from gradleak.errors import ConfigError, DataError

_GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


def _check_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape[1:]) < 1:
        raise ConfigError(
            f"image shape {tuple(shape)} is not (C, H, W) with C = 1 or 3 and H, W >= 1"
        )
    return int(shape[0]), int(shape[1]), int(shape[2])


def _open(path: Path) -> Image.Image:
    """Open and fully decode ``path``; every failure becomes a one-line DataError."""
    if not path.exists():
        raise DataError(f"image not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not an image file")
    try:
        with Image.open(path) as img:
            img.load()
            # Phone photos store their rotation in EXIF; apply it so the tensor looks upright.
            return ImageOps.exif_transpose(img)
    except UnidentifiedImageError as exc:
        raise DataError(f"{path} is not an image file Pillow can read") from exc
    except Image.DecompressionBombError as exc:
        raise DataError(f"image {path} is too large to decode safely") from exc
    except (OSError, SyntaxError, ValueError, EOFError, KeyError, TypeError) as exc:
        # KeyError/TypeError come from malformed EXIF data in exif_transpose.
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"image {path} is corrupt or truncated ({detail})") from exc


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    # Pillow's own conversion clips 16-bit samples at 255 instead of scaling them.
    if img.mode.startswith("I"):
        arr = np.asarray(img, dtype=np.int64)
        if img.mode != "I" or arr.max(initial=0) > 255:
            arr = arr >> 8
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    return img.convert("L")


def decode_image(path: str | Path, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Decode an image file to a uint8 ``(C, H, W)`` array.

    Args:
        path: Any file Pillow can read.
        shape: Target ``(C, H, W)``; ``C`` picks grayscale (1) or RGB (3) and the image is
            resized to ``(H, W)``. ``None`` keeps the size and uses 1 channel for grayscale
            files, 3 for everything else (alpha is dropped).

    Raises:
        DataError: If the file is missing or not a readable image.
        ConfigError: If ``shape`` is not a valid ``(C, H, W)``.
    """
    path = Path(path)
    target = _check_shape(shape) if shape is not None else None
    img = _open(path)
    channels = target[0] if target else (1 if img.mode in _GRAY_MODES else 3)
    img = _to_8bit_gray(img) if channels == 1 else img.convert("RGB")
    if target and img.size != (target[2], target[1]):
        # Pillow widens the bilinear kernel when shrinking, so this is antialiased.
        img = img.resize((target[2], target[1]), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None, :, :] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_image(path: str | Path, *, shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Load an image file as a float32 ``(C, H, W)`` tensor with values in ``[0, 1]``.

    Args:
        path: Any file Pillow can read (PNG, JPEG, BMP, ...).
        shape: Optional target ``(C, H, W)``: ``C`` = 1 converts to grayscale, 3 to RGB,
            and the image is resized (bilinear, antialiased) to ``(H, W)``.

    Returns:
        The image tensor.

    Raises:
        DataError: If the file is missing, not an image, or corrupt (one line, naming it).
        ConfigError: If ``shape`` is not a valid ``(C, H, W)``.
    """
    pixels = decode_image(path, shape)
    return torch.from_numpy(pixels.astype(np.float32)).div_(255.0)
