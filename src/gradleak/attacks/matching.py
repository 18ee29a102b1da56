"""Gradient matching: the objective every DLG-style attack minimises.

The attacker replays a client step on dummy data and measures how far the
dummy gradient is from the shared one.  Both are differentiable in the dummy
data (the dummy gradient is built with ``create_graph=True``), which is why the
model must be twice differentiable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def soft_label_cross_entropy(
    logits: torch.Tensor, label_logits: torch.Tensor, *, as_published: bool = False
) -> torch.Tensor:
    """DLG's loss for dummy labels: cross-entropy against ``softmax(label_logits)``.

    With `as_published`, the published code's expression, op for op:
    ``-mean(sum(softmax(label_logits) * log(softmax(logits))))``.  It equals the
    ``log_softmax`` form in exact arithmetic, not in float32: where a logit gap
    makes a softmax entry 0 (or so small that ``target / p`` overflows), its log
    is -inf and every derivative NaN, and elsewhere the two round differently,
    which plain L-BFGS at lr 1 amplifies.  Faithful mode uses it; improved mode
    the stable ``log_softmax``.
    """
    if as_published:
        target = torch.softmax(label_logits, -1)
        return -torch.mean(torch.sum(target * torch.log(torch.softmax(logits, -1)), dim=-1))
    target = F.softmax(label_logits, dim=-1)
    return torch.mean(torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1))


def squared_distance(dummy: Sequence[torch.Tensor], shared: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared L2 distance summed over all parameter tensors (DLG's objective)."""
    return sum(((d - s) ** 2).sum() for d, s in zip(dummy, shared, strict=True))  # type: ignore[return-value]


def matching_loss(
    model: nn.Module,
    parameters: Sequence[torch.Tensor],
    shared: Sequence[torch.Tensor],
    inputs: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    label_logits: torch.Tensor | None = None,
    as_published: bool = False,
) -> torch.Tensor:
    """Distance between the gradient the dummy batch produces and the shared one.

    Exactly one of `labels` (known integer labels, iDLG) and `label_logits`
    (learned soft labels, DLG) is given; `as_published` picks the published
    soft-label expression (see `soft_label_cross_entropy`).
    """
    logits = model(inputs)
    if labels is not None:
        loss = F.cross_entropy(logits, labels)
    else:
        assert label_logits is not None
        loss = soft_label_cross_entropy(logits, label_logits, as_published=as_published)
    dummy = torch.autograd.grad(loss, parameters, create_graph=True)
    return squared_distance(dummy, shared)
