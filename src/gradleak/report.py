"""Pictures and tables for people: PNG strips, plots, markdown.

Matplotlib runs headless (Agg) and is imported only here, so the library
itself never needs a display or pays for the import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def to_image(x: torch.Tensor):  # -> numpy array for imshow
    """``(C, H, W)`` tensor -> an array imshow draws; clamped to [0, 1], NaN grey."""
    x = torch.nan_to_num(x.detach().float().cpu(), nan=0.5, posinf=1.0, neginf=0.0).clamp(0, 1)
    if x.dim() == 4:
        x = x[0]
    if x.shape[0] == 1:
        return x[0].numpy()
    return x.permute(1, 2, 0).numpy()


def save_strip(
    path: str | Path,
    frames: Sequence[tuple[str, torch.Tensor]],
    *,
    title: str | None = None,
    columns: int = 11,
) -> Path:
    """Save images side by side, wrapping after `columns`, each with a caption.

    Args:
        path: Where the PNG goes (its folder is created).
        frames: ``(caption, image)`` pairs; images are ``(C, H, W)`` in [0, 1].
        title: Optional line above the strip.
        columns: Images per row.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = max(1, min(columns, len(frames)))
    rows = -(-len(frames) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.5 * rows + (0.4 if title else 0)))
    flat = axes.ravel() if hasattr(axes, "ravel") else [axes]
    for ax in flat:
        ax.axis("off")
    for ax, (caption, image) in zip(flat, frames, strict=False):
        pixels = to_image(image)
        ax.imshow(
            pixels,
            cmap="gray" if pixels.ndim == 2 else None,
            vmin=0,
            vmax=1,
            interpolation="nearest",
        )
        ax.set_title(caption, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
