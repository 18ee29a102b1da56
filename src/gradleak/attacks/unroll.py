"""The client's optimiser, written out so that the attacker can differentiate through it.

A FedAvg client runs ``torch.optim.SGD`` (momentum, Nesterov, weight decay)
or ``Adam``/``AdamW`` over its local steps.  To invert its update the attacker
replays those steps on dummy examples and differentiates the result in the
dummies, so each step must be a pure function of tensors that carry the
graph: ``torch.optim`` updates its parameters in place and cannot.  These are
the same recursions as ``torch.optim``'s single-tensor code paths (dampening
0, no amsgrad, not maximising), operation for operation, so that the replay
of the client's own examples in the client's order gives the client's update
to rounding (tests/test_unroll.py holds them to ``torch.optim`` step for step
in float64).

One point differs from torch on purpose: Adam's ``sqrt(v)`` has an infinite
derivative at ``v = 0`` (a weight no example has touched yet), which would
turn the attacker's double backward into NaN; there the square root is taken
as 0 with derivative 0, the same value torch computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gradleak.types import ClientOptimizer

__all__ = ["FunctionalOptimizer"]


@dataclass
class _State:
    step: int = 0
    first: dict[str, torch.Tensor] = field(default_factory=dict)  # momentum buffer or Adam's m
    second: dict[str, torch.Tensor] = field(default_factory=dict)  # Adam's v


class FunctionalOptimizer:
    """``params -> params`` steps of a `ClientOptimizer`, graph kept.

    One instance is one client's round: its state (momentum buffers, Adam's
    moments and step count) starts empty, as a freshly built ``torch.optim``
    optimiser's does.
    """

    def __init__(self, spec: ClientOptimizer, lr: float) -> None:
        self.spec = spec
        self.lr = float(lr)
        self.state = _State()

    def step(
        self, parameters: dict[str, torch.Tensor], gradients: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The parameters after one step on `gradients` (a new dict; inputs untouched)."""
        self.state.step += 1
        if self.spec.kind == "sgd":
            return {name: self._sgd(name, p, gradients[name]) for name, p in parameters.items()}
        return {name: self._adam(name, p, gradients[name]) for name, p in parameters.items()}

    def _sgd(self, name: str, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.weight_decay:
            g = g + spec.weight_decay * p
        if spec.momentum:
            previous = self.state.first.get(name)
            buffer = g if previous is None else spec.momentum * previous + g
            self.state.first[name] = buffer
            g = g + spec.momentum * buffer if spec.nesterov else buffer
        return p - self.lr * g

    def _adam(self, name: str, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        beta1, beta2 = spec.betas
        if spec.kind == "adamw":
            p = p * (1 - self.lr * spec.weight_decay)
        elif spec.weight_decay:
            g = g + spec.weight_decay * p
        m = self.state.first.get(name)
        v = self.state.second.get(name)
        m = (1 - beta1) * g if m is None else beta1 * m + (1 - beta1) * g
        v = (1 - beta2) * g * g if v is None else beta2 * v + (1 - beta2) * g * g
        self.state.first[name], self.state.second[name] = m, v
        t = self.state.step
        step_size = self.lr / (1 - beta1**t)
        correction2 = (1 - beta2**t) ** 0.5
        denominator = _safe_sqrt(v) / correction2 + spec.eps
        return p - step_size * (m / denominator)


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """``sqrt(v)``, with derivative 0 instead of infinity where ``v == 0``."""
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), 0.0)
