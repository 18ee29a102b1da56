"""The LeNet variants of the DLG and iDLG papers.

Three 5x5 convolutions with 12 channels (padding 2), a Sigmoid after each, and
one Linear layer.  iDLG's protocol uses strides 2, 2, 1; DLG's paper says its
model has the strides removed (``strides=(1, 1, 1)``, model "lenet-dlg"), which
keeps every layer as wide as the image and gives the attack far more equations
per example; that is what makes batches identifiable (see the README).
Sigmoid instead of ReLU because the attack differentiates the gradient again:
the model must be twice differentiable.
Every weight and bias starts uniform in [-0.5, 0.5], as in iDLG's protocol;
with PyTorch's default (much smaller) init the attack behaves differently.
"""

from __future__ import annotations

import torch
from torch import nn


class LeNet(nn.Module):
    """iDLG's LeNet: 588 hidden features for 1x28x28 inputs, 768 for 3x32x32.

    Args:
        input_shape: ``(channels, height, width)`` of one example.
        num_classes: Number of output logits.
        strides: The three convolutions' strides; ``(1, 1, 1)`` is DLG's
            stride-free model (12 * height * width hidden features).
        generator: Source of randomness for the uniform init (explicit seeds).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        num_classes: int = 100,
        *,
        strides: tuple[int, int, int] = (2, 2, 1),
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        layers: list[nn.Module] = []
        for index, stride in enumerate(strides):
            layers += [
                nn.Conv2d(channels if index == 0 else 12, 12, 5, padding=2, stride=stride),
                nn.Sigmoid(),
            ]
            # Kernel 5 with padding 2 and stride s maps n to ceil(n / s).
            height, width = -(-height // stride), -(-width // stride)
        self.body = nn.Sequential(*layers)
        hidden = 12 * height * width
        self.fc = nn.Linear(hidden, num_classes)
        uniform_init_(self, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


@torch.no_grad()
def uniform_init_(
    model: nn.Module,
    *,
    low: float = -0.5,
    high: float = 0.5,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Draw every parameter of `model` uniformly from [low, high], in place."""
    for parameter in model.parameters():
        parameter.uniform_(low, high, generator=generator)
    return model
