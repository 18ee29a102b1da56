"""The victim's side: one client step of FedSGD, seen from the server.

`observe` runs what an honest client runs (forward its private batch, take the
cross-entropy against one-hot labels, back-propagate) and returns only what
leaves the client: the gradient, next to the model the server sent.  Defenses
are transforms applied here, on the client, before the gradient is shared.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.errors import ConfigError
from gradleak.types import Observation

GradientTransform = Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]


def client_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Gradient of the mean cross-entropy of `model` on the batch ``(x, y)``."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x), y)
    return tuple(g.detach() for g in torch.autograd.grad(loss, parameters))


def observe(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    defense: GradientTransform | None = None,
) -> Observation:
    """Simulate one client step and return what the attacker sees.

    Args:
        model: The global model as the server sent it (not modified).
        x: The client's private batch, shape ``(batch, *input_shape)``; a
            single example without the batch dimension is accepted too.
        y: Its integer labels, shape ``(batch,)`` (or a scalar for one example).
        defense: Optional transform the client applies to its gradient
            before sharing it.

    Returns:
        The shared gradient with the model, input shape and class count.
    """
    y = torch.as_tensor(y, device=x.device).long()
    if y.dim() == 0:  # one example given without its batch dimension
        x, y = x.unsqueeze(0), y.reshape(1)
    if x.shape[0] != y.shape[0]:
        raise ConfigError(
            f"batch mismatch: {x.shape[0]} inputs but {y.shape[0]} labels; give one label per input"
        )
    num_classes = _num_classes(model, x[:1])
    if int(y.max()) >= num_classes or int(y.min()) < 0:
        raise ConfigError(
            f"label {int(y.max())} is outside the model's {num_classes} classes; "
            "build the model with more classes"
        )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gradients = client_gradients(model, x, y)
    if defense is not None:
        gradients = tuple(defense(gradients))
    return Observation(
        model=model,
        gradients=gradients,
        parameter_names=tuple(n for n, _ in named),
        input_shape=tuple(x.shape[1:]),
        num_classes=num_classes,
        batch_size=int(x.shape[0]),
    )


def _num_classes(model: nn.Module, example: torch.Tensor) -> int:
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if last_linear:
        return last_linear[-1].out_features
    with torch.no_grad():
        return int(model(example).shape[-1])
