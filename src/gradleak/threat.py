"""The victim's side: one client step of FedSGD, seen from the server.

`observe` runs what an honest client runs (forward its private batch, take the
cross-entropy against one-hot labels, back-propagate) and returns only what
leaves the client: the gradient, next to the model the server sent.  Defenses
act here, on the client, before the gradient is shared: a `defense` transform
changes the finished gradient (noise, precision, pruning), a `step` replaces
how the client computes it (DP-SGD's per-example clipping and noise), and
`observe_aggregate` shows the attacker only the mean of several clients'
gradients (secure aggregation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.defenses.base import ClientStep, GradientTransform
from gradleak.errors import ConfigError
from gradleak.types import Observation

__all__ = ["ClientStep", "GradientTransform", "client_gradients", "observe", "observe_aggregate"]


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
    step: ClientStep | None = None,
) -> Observation:
    """Simulate one client step and return what the attacker sees.

    Args:
        model: The global model as the server sent it (not modified).
        x: The client's private batch, shape ``(batch, *input_shape)``; a
            single example without the batch dimension is accepted too.
        y: Its integer labels, shape ``(batch,)`` (or a scalar for one example).
        defense: Optional transform the client applies to its gradient
            before sharing it.
        step: Optional replacement for the plain gradient computation,
            ``step(model, x, y) -> gradients`` (e.g. `gradleak.defenses.dp_sgd`).

    Returns:
        The shared gradient with the model, input shape and class count.
    """
    return observe_aggregate(model, [(x, y)], defense=defense, step=step)


def observe_aggregate(
    model: nn.Module,
    clients: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    defense: GradientTransform | None = None,
    step: ClientStep | None = None,
) -> Observation:
    """Simulate k clients' steps under secure aggregation: the attacker sees their mean.

    Every client computes its gradient on its own batch (with `step` when
    given) and applies `defense` to it, as in `observe`; the aggregation then
    releases only the plain mean of the k shared gradients.

    Args:
        model: The global model, the same for every client (not modified).
        clients: One private batch ``(x, y)`` per client, shaped as for `observe`.
        defense: Transform each client applies to its own gradient.
        step: Replacement for each client's gradient computation.

    Returns:
        The aggregate; its `batch_size` counts the examples of all clients.
    """
    if not clients:
        raise ConfigError("secure aggregation needs at least one client")
    batches = [_as_batch(model, x, y) for x, y in clients]
    compute = step if step is not None else client_gradients
    shared = []
    for x, y in batches:
        gradients = tuple(compute(model, x, y))
        shared.append(tuple(defense(gradients)) if defense is not None else gradients)
    if len(shared) == 1:
        mean = shared[0]  # one client: its gradient, bit for bit
    else:
        mean = tuple(torch.stack(parts).mean(0) for parts in zip(*shared, strict=True))
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    x0 = batches[0][0]
    return Observation(
        model=model,
        gradients=mean,
        parameter_names=tuple(named),
        input_shape=tuple(x0.shape[1:]),
        num_classes=_num_classes(model, x0[:1]),
        batch_size=sum(int(x.shape[0]) for x, _ in batches),
    )


def _as_batch(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check one client's batch and give it a batch dimension."""
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
    return x, y


def _num_classes(model: nn.Module, example: torch.Tensor) -> int:
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if last_linear:
        return last_linear[-1].out_features
    with torch.no_grad():
        return int(model(example).shape[-1])
