"""The two values that cross the victim/attacker boundary.

An `Observation` is everything a curious server (or peer) holds after one
FedSGD step of a client: the model it sent out and the gradient that came
back.  A `Reconstruction` is what an attack makes of it.  Attacks import this
module and nothing on the victim's side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Observation:
    """What the attacker sees after a client shares its gradient.

    Attributes:
        model: The model with the weights the client computed its gradient at.
            The attacker knows the architecture and the weights (it sent them).
        gradients: The shared gradient, one tensor per entry of
            `model.named_parameters()`, in that order.
        parameter_names: The names of those parameters, aligned with `gradients`.
        input_shape: Shape of one example, e.g. ``(3, 32, 32)``.
        num_classes: Size of the label space.
        batch_size: How many examples the client's gradient averages over.
    """

    model: nn.Module
    gradients: tuple[torch.Tensor, ...]
    parameter_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int = 1

    @property
    def device(self) -> torch.device:
        return self.gradients[0].device

    def gradient(self, name: str) -> torch.Tensor:
        """The shared gradient of the parameter called `name`."""
        return self.gradients[self.parameter_names.index(name)]


@dataclass(frozen=True)
class Snapshot:
    """The dummy input at one step of the optimisation (on the CPU)."""

    step: int
    inputs: torch.Tensor


@dataclass(frozen=True)
class Reconstruction:
    """What an attack recovered, and what it cost.

    Attributes:
        inputs: Recovered inputs, shape ``(batch_size, *input_shape)``; not clamped.
        labels: Recovered labels, shape ``(batch_size,)``.
        loss_history: Gradient-matching loss after each optimiser step.
        snapshots: Dummy inputs every `snapshot_every` steps, starting at step 0.
        steps: Optimiser steps taken (over all restarts).
        evaluations: Gradient-matching evaluations (forward + double backward).
        restarts: Fresh random starts after the first.
        converged: Whether the matching loss fell below the tolerance.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    loss_history: tuple[float, ...] = ()
    snapshots: tuple[Snapshot, ...] = field(default=(), repr=False)
    steps: int = 0
    evaluations: int = 0
    restarts: int = 0
    converged: bool = False

    @property
    def final_loss(self) -> float:
        return self.loss_history[-1] if self.loss_history else float("nan")
