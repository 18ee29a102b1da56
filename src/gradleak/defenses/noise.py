"""Noisy gradients: the client adds zero-mean noise to every entry it shares.

DLG's first defense.  The noise comes from an explicit `torch.Generator`
(drawn on the CPU, so a seed means the same noise on every device); equal
seeds give equal noise, and no global random state is touched.
"""

from __future__ import annotations

import torch

from gradleak.defenses.base import Gradients


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(0 if seed is None else int(seed))


def _check_scale(scale: float) -> float:
    scale = float(scale)
    if not scale >= 0:  # also rejects NaN
        raise ValueError(f"noise scale must be 0 or more, got {scale}")
    return scale


class GaussianNoise:
    """Add ``N(0, scale^2)`` noise to every gradient entry.

    Args:
        scale: Standard deviation of the noise.
        generator: Source of the noise; advances with every call.
    """

    def __init__(self, scale: float, generator: torch.Generator) -> None:
        self.scale = _check_scale(scale)
        self.generator = generator

    def __call__(self, gradients: Gradients) -> Gradients:
        return tuple(g + self.scale * self._draw(g) for g in gradients)

    def _draw(self, like: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(like.shape, generator=self.generator, dtype=torch.float64)
        return noise.to(like.device, like.dtype)

    def __repr__(self) -> str:
        return f"gaussian({self.scale:g})"


class LaplacianNoise(GaussianNoise):
    """Add Laplace noise of scale ``b`` (standard deviation ``sqrt(2) b``) to every entry.

    Drawn as ``b (E1 - E2)`` with ``E1, E2`` standard exponentials, which is
    exactly Laplace(0, b) and needs only the generator's uniform draws.
    """

    def _draw(self, like: torch.Tensor) -> torch.Tensor:
        u = torch.rand((2, *like.shape), generator=self.generator, dtype=torch.float64)
        exponentials = -torch.log1p(-u)  # u in [0, 1): finite
        return (exponentials[0] - exponentials[1]).to(like.device, like.dtype)

    def __repr__(self) -> str:
        return f"laplacian({self.scale:g})"


def gaussian(
    scale: float, *, seed: int | None = None, generator: torch.Generator | None = None
) -> GaussianNoise:
    """Gaussian noise of standard deviation `scale` (seed 0 unless given)."""
    return GaussianNoise(scale, _generator(seed, generator))


def laplacian(
    scale: float, *, seed: int | None = None, generator: torch.Generator | None = None
) -> LaplacianNoise:
    """Laplacian noise of scale `scale` (seed 0 unless given)."""
    return LaplacianNoise(scale, _generator(seed, generator))
