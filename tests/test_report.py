"""The pictures people look at: a strip's title stays inside its picture."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import torch

from gradleak.report import save_strip_rows


def test_a_long_title_on_a_narrow_strip_is_wrapped_not_clipped(tmp_path: Path) -> None:
    # An attack done at step 0 leaves a strip of two columns, narrower than the
    # reproduction's title; drawn on one line, the title ran off both edges.
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    title = "LFW, experiment 0: the dummy as L-BFGS runs (improved), a title of some length"
    rows = [(name, [("original", image), ("step 0", image)]) for name in ("DLG", "iDLG")]
    path = save_strip_rows(tmp_path / "strip.png", rows, title=title)
    pixels = matplotlib.image.imread(path)[..., :3]
    band = pixels[: pixels.shape[0] // 6]  # the title's part of the picture
    assert (band < 0.5).any(), "no title drawn"
    edges = torch.from_numpy(band[:, [0, 1, -2, -1]].copy())
    assert bool((edges > 0.95).all()), "the title touches the picture's edge"
