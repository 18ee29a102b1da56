"""The matching objective of a plain conv net for a few victims, without vmap.

`BatchedObjective` vmaps one victim's objective over all victims.  That is the
fast way for many victims, but each vmapped call pays several milliseconds of
fixed cost (the grouped convolutions' double backward), which is what a batch
pays at its end, when only a few slow victims are left and each call
evaluates a handful of them.

For plain feed-forward nets (convolutions, element-wise activations, a
flatten, linear layers: the papers' LeNet) this module writes the same
objective with every victim's weights stacked on a leading axis: a
convolution is an unfold followed by a batched matrix product, a linear layer
a batched matrix product, and ordinary autograd differentiates twice.  At one
to a few LeNet victims it runs 2-3 times faster than the vmapped call; with
dozens of victims, or one victim of a wide net (DLG's stride-free LeNet), the
unfolded patches grow large and the vmapped grouped convolutions win.  Both
compute the same numbers (tests compare them).

explicit.py writes both derivatives out by hand for the usual layouts
(LeNet's among them), which costs less again; `stacked_matching` serves the
plain nets it does not cover.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.attacks.matching import soft_label_cross_entropy

_ACTIVATIONS: dict[type[nn.Module], Callable[[torch.Tensor], torch.Tensor]] = {
    nn.Sigmoid: torch.sigmoid,
    nn.Tanh: torch.tanh,
}


@dataclass(frozen=True)
class Layer:
    """One step of a plain net: "conv", "linear", "flatten" or an activation."""

    kind: str
    weight: str | None = None  # parameter names, as in `named_parameters`
    bias: str | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None


def plain_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[Layer] | None:
    """The layers of `model` in forward order, or None when it is not a plain net.

    The guess takes the model's leaf modules in the order they were
    registered (a flatten goes in before the first linear layer that follows
    a convolution) and keeps it only if, on a random input of one example's
    `input_shape`, it computes what the model's own forward computes: a model
    that reorders, skips or adds anything between its layers is never
    mistaken for a plain net.
    """
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    layers: list[Layer] = []
    for name, module in leaves:
        layer = _layer(name, module)
        if layer is None:
            return None
        kinds = {x.kind for x in layers}
        if layer.kind == "linear" and "conv" in kinds and "flatten" not in kinds:
            layers.append(Layer("flatten"))
        layers.append(layer)
    if not layers or not _agrees(model, layers, tuple(input_shape)):
        return None
    return layers


def _agrees(model: nn.Module, layers: list[Layer], input_shape: tuple[int, ...]) -> bool:
    first = next(model.parameters(), None)
    if first is None:
        return False
    params = {n: p.detach()[None] for n, p in model.named_parameters()}
    x = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(first)
    try:
        with torch.no_grad():
            ours = stacked_forward(layers, params, x[None])[0]
            theirs = model(x)
    except RuntimeError:  # e.g. a linear layer that in truth runs before a convolution
        return False
    if ours.shape != theirs.shape:
        return False
    return float((ours - theirs).abs().max()) <= 1e-4 * (1 + float(theirs.abs().max()))


def _layer(name: str, module: nn.Module) -> Layer | None:
    prefix = f"{name}." if name else ""
    bias = f"{prefix}bias" if getattr(module, "bias", None) is not None else None
    if isinstance(module, nn.Conv2d):
        plain = (
            module.groups == 1
            and module.dilation == (1, 1)
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)
        )
        if not plain:
            return None
        return Layer("conv", f"{prefix}weight", bias, module.stride, module.padding)  # type: ignore[arg-type]
    if isinstance(module, nn.Linear):
        return Layer("linear", f"{prefix}weight", bias)
    if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1:
        return Layer("flatten")
    if type(module) in _ACTIVATIONS:
        return Layer("activation", activation=_ACTIVATIONS[type(module)])
    return None


def stacked_forward(
    layers: Sequence[Layer], params: dict[str, torch.Tensor], x: torch.Tensor
) -> torch.Tensor:
    """Logits ``(V, B, classes)`` of V victims' nets on their inputs ``(V, B, ...)``.

    `params` maps each parameter name to the victims' stacked values ``(V, ...)``.
    """
    victims, batch = x.shape[:2]
    h = x
    for layer in layers:
        if layer.kind == "conv":
            weight = params[layer.weight]  # type: ignore[index]
            channels, size = weight.shape[2], weight.shape[-2:]  # (V, O, C, k, k)
            height, width = h.shape[-2:]
            columns = F.unfold(
                h.reshape(victims * batch, channels, height, width),
                size, padding=layer.padding, stride=layer.stride,
            )  # fmt: skip
            # (V, C*k*k, B*L): every example's patches side by side.
            columns = columns.reshape(victims, batch, *columns.shape[1:])
            columns = columns.transpose(1, 2).reshape(victims, columns.shape[2], -1)
            out = torch.bmm(weight.flatten(2), columns)  # (V, O, B*L)
            if layer.bias is not None:
                out = out + params[layer.bias][:, :, None]
            rows = (height + 2 * layer.padding[0] - size[0]) // layer.stride[0] + 1
            cols = (width + 2 * layer.padding[1] - size[1]) // layer.stride[1] + 1
            h = out.reshape(victims, -1, batch, rows, cols).transpose(1, 2)
        elif layer.kind == "linear":
            h = torch.bmm(h, params[layer.weight].transpose(1, 2))  # type: ignore[index]
            if layer.bias is not None:
                h = h + params[layer.bias][:, None, :]
        elif layer.kind == "flatten":
            h = h.reshape(victims, batch, -1)
        else:
            h = layer.activation(h)  # type: ignore[misc]
    return h


def unfolded_size(
    layers: Sequence[Layer], params: dict[str, torch.Tensor], input_shape: tuple[int, ...]
) -> int:
    """Entries of the unfolded patch matrices of one example, summed over conv layers.

    The stacked path's cost grows with this number; `params` may be stacked
    ``(V, ...)`` or not, only the trailing shapes matter.
    """
    total, shape = 0, tuple(input_shape)
    for layer in layers:
        if layer.kind != "conv":
            continue
        weight = params[layer.weight]  # type: ignore[index]
        out_channels, channels, kh, kw = weight.shape[-4:]
        rows = (shape[-2] + 2 * layer.padding[0] - kh) // layer.stride[0] + 1
        cols = (shape[-1] + 2 * layer.padding[1] - kw) // layer.stride[1] + 1
        total += channels * kh * kw * rows * cols
        shape = (out_channels, rows, cols)
    return total


def stacked_matching(
    layers: Sequence[Layer],
    params: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    z: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    batch_size: int,
    input_shape: tuple[int, ...],
    as_published: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each victim's matching loss ``(V,)`` and its gradient in ``z`` ``(V, size)``.

    The same objective as `BatchedObjective._one`, for all victims at once:
    victim v's client loss is the mean over its own batch, so summing the
    victims' losses leaves each victim's weight gradient its own.
    """
    victims = z.shape[0]
    z = z.detach().requires_grad_()
    leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
    input_size = batch_size * math.prod(input_shape)
    x = z[:, :input_size].reshape(victims, batch_size, *input_shape)
    with torch.enable_grad():
        logits = stacked_forward(layers, leaves, x)
        if labels is None:
            label_logits = z[:, input_size:].reshape(victims * batch_size, -1)
            per_example = soft_label_cross_entropy(
                logits.flatten(0, 1), label_logits, as_published=as_published
            ) * (victims * batch_size)
        else:
            per_example = F.cross_entropy(logits.flatten(0, 1), labels.reshape(-1), reduction="sum")
        client_losses = per_example / batch_size  # the sum over victims of their means
        names = list(leaves)
        dummy = torch.autograd.grad(client_losses, [leaves[n] for n in names], create_graph=True)
        loss = sum(
            (d - targets[n]).pow(2).flatten(1).sum(1) for n, d in zip(names, dummy, strict=True)
        )
        (gradient,) = torch.autograd.grad(loss.sum(), z)  # type: ignore[union-attr]
    return loss.detach(), gradient.detach()  # type: ignore[union-attr]
