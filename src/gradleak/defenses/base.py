"""What a defense is: a change to what a client shares, applied on the client.

Most defenses are a `GradientTransform`, a function from the client's gradient
(one tensor per parameter) to the gradient it sends.  Transforms compose.  Two
defenses change more than the finished gradient, so a `ClientDefense` also
describes how the client computes it (`step`, e.g. DP-SGD's per-example
clipping) and how many clients' gradients the server gets to see only as a
mean (secure aggregation).  Nothing here imports the threat simulation or the
attacks: `gradleak.threat` applies these, attacks never see them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Gradients = tuple[torch.Tensor, ...]
GradientTransform = Callable[[Gradients], Gradients]
# A client's whole step: (model, inputs, labels) -> the gradient it would share.
ClientStep = Callable[[nn.Module, torch.Tensor, torch.Tensor], Gradients]


class Compose:
    """Apply transforms one after another, the first one first.

    ``compose(prune(0.3), gaussian(1e-3, seed=0))`` prunes, then adds noise
    to what is left, as a client that compresses and then privatises would.
    """

    def __init__(self, *transforms: GradientTransform) -> None:
        self.transforms = tuple(transforms)

    def __call__(self, gradients: Gradients) -> Gradients:
        for transform in self.transforms:
            gradients = tuple(transform(gradients))
        return gradients

    def __repr__(self) -> str:
        return f"compose({', '.join(map(repr, self.transforms))})"


def compose(*transforms: GradientTransform) -> Compose:
    """Chain gradient transforms into one (see `Compose`)."""
    return Compose(*transforms)


def identity(gradients: Gradients) -> Gradients:
    """The `none` defense: share the gradient as computed."""
    return gradients


@dataclass(frozen=True)
class ClientDefense:
    """Everything a defense changes about what leaves the clients.

    Attributes:
        name: The registry name ("gaussian", "aggregate", ...).
        strength: Its one knob (noise scale, share pruned, clients, ...), or
            None for a defense without one (fp16).
        transform: Applied by each client to its gradient before sharing.
        step: Replaces the client's plain gradient computation (DP-SGD);
            None for the ordinary mean cross-entropy gradient.
        clients: How many clients' gradients the attacker sees only as their
            mean (secure aggregation); 1 means it sees one client's.
        examples: Examples in each client's batch.
    """

    name: str
    strength: float | None = None
    transform: GradientTransform | None = None
    step: ClientStep | None = None
    clients: int = 1
    examples: int = 1

    @property
    def label(self) -> str:
        """Short name for tables and plots: ``gaussian 0.01``, ``fp16``."""
        if self.strength is None:
            return self.name
        return f"{self.name} {self.strength:g}"
