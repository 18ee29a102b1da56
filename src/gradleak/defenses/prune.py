"""Gradient compression: zero the smallest-magnitude entries before sharing.

The DLG paper's pruning defense (deep gradient compression): in each tensor
the share `p` of entries with the smallest absolute value is set to zero and
the rest is sent unchanged.
"""

from __future__ import annotations

import math

import torch

from gradleak.defenses.base import Gradients


class Prune:
    """Zero ``floor(share * numel)`` smallest-magnitude entries of every tensor.

    Exactly that many: ties at the cut are broken by position (a stable
    sort), so a tensor of equal values loses its first entries and no more.
    Entries that are zero already count among the smallest.

    Args:
        share: Fraction of each tensor to zero, in [0, 1].
    """

    def __init__(self, share: float) -> None:
        share = float(share)
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"prune share must be in [0, 1], got {share}")
        self.share = share

    def pruned_count(self, numel: int) -> int:
        """How many entries of a tensor with `numel` entries are zeroed."""
        # The small epsilon keeps 0.3 * 10 from flooring to 2 in floating point.
        return min(numel, math.floor(self.share * numel + 1e-9))

    def __call__(self, gradients: Gradients) -> Gradients:
        return tuple(self._one(g) for g in gradients)

    def _one(self, g: torch.Tensor) -> torch.Tensor:
        count = self.pruned_count(g.numel())
        flat = g.detach().clone().reshape(-1)
        if count:
            smallest = flat.abs().argsort(stable=True)[:count]
            flat[smallest] = 0
        return flat.reshape(g.shape)

    def __repr__(self) -> str:
        return f"prune({self.share:g})"


def prune(share: float) -> Prune:
    """Zero the `share` smallest-magnitude entries of each tensor (see `Prune`)."""
    return Prune(share)
