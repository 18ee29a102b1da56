"""DP-SGD on the client, through Opacus: per-example clipping plus Gaussian noise.

The client computes one gradient per example (Opacus' `GradSampleModule`),
clips each to L2 norm `max_grad_norm`, sums them, adds ``N(0, (sigma C)^2)``
to every entry and divides by the batch size: exactly the gradient Opacus'
`DPOptimizer` hands to the wrapped optimizer (``pre_step``).  That gradient
is what the client shares.  `epsilon` turns the noise multiplier, sampling
rate and number of steps into a privacy guarantee with Opacus' RDP
accountant.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.defenses.base import Gradients

DEFAULT_CLIP = 1.0  # max per-example gradient norm C
DEFAULT_DELTA = 1e-5


class DPSGDStep:
    """One client step of DP-SGD; a `ClientStep` for `gradleak.threat.observe`.

    Args:
        noise_multiplier: sigma; the noise's standard deviation is
            ``sigma * max_grad_norm`` (before dividing by the batch size).
        max_grad_norm: C, the per-example clipping norm.
        generator: Source of the noise (CPU); advances with every call.
    """

    def __init__(
        self, noise_multiplier: float, max_grad_norm: float, generator: torch.Generator
    ) -> None:
        if not noise_multiplier >= 0:
            raise ValueError(f"noise multiplier must be 0 or more, got {noise_multiplier}")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.generator = generator

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Gradients:
        # Imported here: Opacus takes seconds to import, and only DP-SGD needs it.
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        # Opacus hooks the module it wraps; wrap a copy so the caller's model stays as sent.
        private = GradSampleModule(copy.deepcopy(model), loss_reduction="mean")
        parameters = [p for p in private.parameters() if p.requires_grad]
        optimizer = DPOptimizer(
            torch.optim.SGD(parameters, lr=1.0),
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=int(x.shape[0]),
            loss_reduction="mean",
            generator=self._generator_for(x.device),
        )
        optimizer.zero_grad()
        with warnings.catch_warnings():
            # Opacus' hooks fire with inputs that need no gradient, by design here.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            F.cross_entropy(private(x), y).backward()
        optimizer.pre_step()  # clip, sum, add noise, divide by the batch size
        gradients = tuple(p.grad.detach().clone() for p in parameters)
        private._close()
        return gradients

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if device.type == "cpu":
            return self.generator
        # Opacus draws on the gradient's device: seed a generator there from ours.
        seed = int(torch.randint(2**62, (1,), generator=self.generator))
        return torch.Generator(device).manual_seed(seed)

    def __repr__(self) -> str:
        return f"dp_sgd(noise_multiplier={self.noise_multiplier:g}, C={self.max_grad_norm:g})"


def dp_sgd(
    noise_multiplier: float,
    *,
    max_grad_norm: float = DEFAULT_CLIP,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> DPSGDStep:
    """A DP-SGD client step (see `DPSGDStep`); noise from `generator` or `seed` (0)."""
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    return DPSGDStep(noise_multiplier, max_grad_norm, generator)


def epsilon(
    noise_multiplier: float, *, sample_rate: float, steps: int, delta: float = DEFAULT_DELTA
) -> float:
    """The (epsilon, delta) guarantee of `steps` DP-SGD steps, by Opacus' RDP accountant.

    Args:
        noise_multiplier: sigma of every step.
        sample_rate: Share of the data set in each batch (1 for one full-batch step).
        steps: Number of steps.
        delta: The delta of the guarantee.

    Returns:
        epsilon; infinity without noise.
    """
    if noise_multiplier <= 0 or steps <= 0:
        return math.inf if steps > 0 else 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        # Tiny noise gives huge epsilons at the edge of the accountant's orders; fine here.
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))
