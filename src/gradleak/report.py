"""Pictures and tables for people: PNG strips, plots, markdown.

Matplotlib runs headless (Agg) and is imported only here, so the library
itself never needs a display or pays for the import.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


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
        _show(ax, pixels, caption, fontsize=8)
    return _save(fig, path, title)


def _show(ax: Axes, pixels: np.ndarray, caption: str, *, fontsize: int) -> None:
    ax.imshow(
        pixels,
        cmap="gray" if pixels.ndim == 2 else None,
        vmin=0,
        vmax=1,
        interpolation="nearest",
    )
    ax.set_title(caption, fontsize=fontsize)


_TITLE_LINE = 0.16  # inches a line of the 9 pt title takes


def _save(fig: Figure, path: Path, title: str | None) -> Path:
    if title:
        # A narrow strip (an attack done at step 0 has two columns) would clip a long
        # title: wrap it to the figure's width (about 11 characters an inch at 9 pt).
        lines = textwrap.wrap(title, width=max(16, int(fig.get_figwidth() * 11)))
        width, height = fig.get_size_inches()
        height += _TITLE_LINE * (len(lines) - 1)
        fig.set_size_inches(width, height)
        fig.suptitle("\n".join(lines), fontsize=9)
        # Keep the title's lines (plus a margin) clear of the first row's captions:
        # tight_layout alone let a two-line title overlap them.
        fig.tight_layout(rect=(0, 0, 1, 1 - (_TITLE_LINE * len(lines) + 0.1) / height))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_strip_rows(
    path: str | Path,
    rows: Sequence[tuple[str, Sequence[tuple[str, torch.Tensor]]]],
    *,
    title: str | None = None,
) -> Path:
    """Save one strip of images per row, each row named on its left (iDLG's Figure 2).

    Args:
        path: Where the PNG goes (its folder is created).
        rows: ``(row name, [(caption, image), ...])``; rows may differ in length.
            Images are ``(C, H, W)`` in [0, 1].
        title: Optional line above the rows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = max(1, max((len(frames) for _, frames in rows), default=1))
    height = 1.5 * max(1, len(rows)) + (0.4 if title else 0)
    fig, axes = plt.subplots(max(1, len(rows)), cols, figsize=(1.2 * cols + 0.6, height))
    grid = axes.reshape(max(1, len(rows)), cols) if hasattr(axes, "reshape") else [[axes]]
    for r, (name, frames) in enumerate(rows):
        for c in range(cols):
            ax = grid[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(frames):
                ax.axis("off")
                continue
            caption, image = frames[c]
            pixels = to_image(image)
            _show(ax, pixels, caption, fontsize=7)
            for spine in ax.spines.values():
                spine.set_visible(False)
        grid[r][0].set_ylabel(name, fontsize=9)
    return _save(fig, path, title)


def save_fidelity_plot(
    path: str | Path,
    thresholds: Sequence[float],
    ours: Mapping[str, Sequence[float]],
    *,
    reference: Mapping[str, Sequence[float]] | None = None,
    reference_label: str = "paper",
    title: str | None = None,
) -> Path:
    """Plot the share of experiments whose MSE is below each threshold (iDLG's Figure 1).

    Args:
        path: Where the PNG goes (its folder is created).
        thresholds: MSE thresholds, drawn on a log axis from loosest to strictest.
        ours: Method name -> percent of experiments below each threshold
            (NaN where there is nothing to show).
        reference: Optional method name -> percent from elsewhere (the paper),
            drawn dashed in the colour of the same method.
        reference_label: Added to the reference lines' legend entries.
        title: Optional plot title.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys([*ours, *(reference or {})]))
    for i, name in enumerate(names):
        colour = colours[i % len(colours)]
        if name in ours:
            ax.plot(thresholds, ours[name], "o-", color=colour, label=f"{name} (ours)")
        if reference and name in reference:
            ax.plot(
                thresholds,
                reference[name],
                "s--",
                color=colour,
                alpha=0.7,
                label=f"{name} {reference_label}",
            )
    ax.set_xscale("log")
    ax.set_xlim(max(thresholds) * 1.5, min(thresholds) / 1.5)  # loosest on the left
    ax.set_xticks(list(thresholds))
    ax.set_xticklabels([f"{t:g}" for t in thresholds])
    ax.minorticks_off()
    ax.set_ylim(0, 102)
    ax.set_xlabel("MSE threshold")
    ax.set_ylabel("% of experiments with MSE below")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path, None)
