"""The matching objective of plain nets with both derivatives written out.

`stacked_matching` (layered.py) asks autograd for the client's weight
gradient with ``create_graph=True`` and then for that gradient's gradient in
the dummy.  This module computes the same two derivatives by hand, for the
nets `plain_layers` accepts (convolutions and linear layers, each optionally
followed by a sigmoid or tanh, with a flatten before the first linear
layer): no autograd graph is recorded, every unfolded patch matrix is built
once and reused by the forward pass, the weight gradient and the adjoint
pass, and the layouts are chosen so that no step copies a tensor only to
reorder it.  Per LeNet victim it costs 1.5-2.5x less than the autograd
path and 1.5-4x less than the vmapped one (bench/objective.py, BENCHMARKS.md);
tests compare it with the vmapped objective to round-off.

Notation, per victim (every tensor carries the victims on its first axis):
block l maps its input ``a[l-1]`` to columns ``P_l(a[l-1])`` (the unfolded
patches of a convolution, or the flattened features of a linear layer),
pre-activations ``u[l] = W_l P_l(a[l-1]) + b_l`` and ``a[l] = act(u[l])``.
The client's backward pass gives ``e[l] = dCE/du[l]``, the weight gradient
``dW_l = e[l] P_l(a[l-1])^T`` and ``db_l = sum e[l]``.  The matching loss is
``sum_l |dW_l - G_l|^2 + |db_l - Gb_l|^2``; its gradient in the dummy comes
from running the backward pass backwards (stage A, first block to last) and
then the forward pass backwards (stage B, last block to first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradleak.attacks.layered import Layer


@dataclass(frozen=True)
class Block:
    """A convolution or linear layer and the activation after it, if any."""

    kind: str  # "conv" or "linear"
    weight: str
    bias: str | None
    activation: str | None  # "sigmoid", "tanh" or None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)


def plain_blocks(layers: Sequence[Layer]) -> list[Block] | None:
    """`plain_layers`' layers as blocks, or None where the layout is not one this
    module writes out (an activation not right after a layer, a convolution after
    a linear layer, two activations in a row, or a net not ending in a linear layer)."""
    blocks: list[Block] = []
    flattened = False
    for layer in layers:
        if layer.kind in ("conv", "linear"):
            if layer.kind == "conv" and flattened:
                return None
            if layer.kind == "linear" and blocks and blocks[-1].kind == "conv" and not flattened:
                return None
            blocks.append(
                Block(layer.kind, layer.weight, layer.bias, None, layer.stride, layer.padding)  # type: ignore[arg-type]
            )
        elif layer.kind == "flatten":
            if flattened:
                return None
            flattened = True
        else:
            name = _activation_name(layer)
            if name is None or not blocks or blocks[-1].activation is not None:
                return None
            last = blocks[-1]
            blocks[-1] = Block(last.kind, last.weight, last.bias, name, last.stride, last.padding)
    if not blocks or blocks[-1].kind != "linear":
        return None
    return blocks


def _activation_name(layer: Layer) -> str | None:
    if layer.activation is torch.sigmoid:
        return "sigmoid"
    if layer.activation is torch.tanh:
        return "tanh"
    return None


_ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh}


def _slopes(name: str, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and second derivative of the activation, from its output `a`."""
    if name == "sigmoid":
        first = a * (1 - a)
        return first, first * (1 - 2 * a)
    first = 1 - a * a  # tanh
    return first, -2 * a * first


# A product with at most this many columns on the right is a batch of
# matrix-times-vector products (a linear layer: one column per example).
FEW_COLUMNS = 4


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a (V, M, K) @ b (V, K, N)`` in the form the CPU runs fastest.

    bench/products.py times both forms.  With 16 victims of a 100 x 768 layer
    on the 2-core CPU: ``W @ x`` for one column x took 1.7 ms as a batched
    matrix product and 0.56 ms as ``(x^T W^T)^T``; ``W^T @ e`` 2.3 ms against
    0.19 ms as ``(e^T W)^T``; an outer product (K = 1) 2.3 ms against 0.14 ms
    as a broadcast multiply.  For convolutions' shapes the plain product is best.
    """
    if b.shape[1] == 1:
        return a * b
    if b.shape[2] <= FEW_COLUMNS:
        return torch.bmm(b.transpose(1, 2), a.transpose(1, 2)).transpose(1, 2)
    return torch.bmm(a, b)


@dataclass(frozen=True)
class _Site:
    """Where a block sits: its input's shape per victim (C, B, H, W) and its kernel.

    Activations are kept as ``(V, C, B*H*W)``, the layout a block's output
    ``W @ columns`` comes out in, so no step reorders them.
    """

    block: Block
    channels: int
    batch: int
    height: int
    width: int
    kernel: tuple[int, int] = (1, 1)

    def output_shape(self, out_channels: int) -> tuple[int, int, int, int]:
        """(C, B, H, W) of this block's output, the next block's input."""
        if self.block.kind == "linear":
            return out_channels, self.batch, 1, 1
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.block.stride, self.block.padding
        rows = (self.height + 2 * ph - kh) // sh + 1
        cols = (self.width + 2 * pw - kw) // sw + 1
        return out_channels, self.batch, rows, cols

    def columns(self, a: torch.Tensor) -> torch.Tensor:
        """``P``: the input ``(V, C, B*H*W)`` as the columns the weight multiplies.

        A convolution's are its patches ``(V, C*kh*kw, B*h*w)``; a linear
        layer's the flattened features ``(V, C*H*W, B)``, each example's in
        torch's flatten order.
        """
        victims = a.shape[0]
        if self.block.kind == "linear":
            image = a.reshape(victims, self.channels, self.batch, self.height * self.width)
            return image.transpose(2, 3).reshape(victims, -1, self.batch)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.block.stride, self.block.padding
        image = a.reshape(victims, self.channels, self.batch, self.height, self.width)
        patches = F.pad(image, (pw, pw, ph, ph)).unfold(3, kh, sh).unfold(4, kw, sw)
        # (V, C, B, h, w, kh, kw) -> (V, C, kh, kw, B, h, w): one copy.
        patches = patches.permute(0, 1, 5, 6, 2, 3, 4)
        return patches.reshape(victims, self.channels * kh * kw, -1)

    def adjoint(self, columns: torch.Tensor) -> torch.Tensor:
        """``P^T``: columns summed back onto the input's layout ``(V, C, B*H*W)``."""
        victims, rows, total = columns.shape
        if self.block.kind == "linear":
            image = columns.reshape(victims, self.channels, self.height * self.width, self.batch)
            return image.transpose(2, 3).reshape(victims, self.channels, -1)
        per_example = columns.reshape(victims, rows, self.batch, total // self.batch)
        images = F.fold(
            per_example.transpose(1, 2).reshape(victims * self.batch, rows, -1),
            (self.height, self.width), self.kernel,
            padding=self.block.padding, stride=self.block.stride,
        )  # fmt: skip
        images = images.reshape(victims, self.batch, self.channels, -1).transpose(1, 2)
        return images.reshape(victims, self.channels, -1)


def explicit_matching(
    blocks: Sequence[Block],
    params: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    z: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    batch_size: int,
    input_shape: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each victim's matching loss ``(V,)`` and its gradient in ``z`` ``(V, size)``.

    The same numbers as `stacked_matching` (and `BatchedObjective._one`), up
    to round-off.  `labels` ``(V, B)`` are known labels, or None when the
    labels are learned: then ``z`` ends with each victim's label logits.
    """
    victims, count = z.shape[0], len(blocks)
    channels, height, width = input_shape
    input_size = batch_size * math.prod(input_shape)
    x = z[:, :input_size].reshape(victims, batch_size, channels, height * width)
    weights = [params[b.weight].flatten(2) for b in blocks]  # (V, O, C*kh*kw)

    # Forward.  Each block's site and columns are kept: the weight gradient
    # and both adjoint stages reuse them.
    a = x.transpose(1, 2).reshape(victims, channels, -1)  # (V, C, B*H*W)
    sites: list[_Site] = []
    columns: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    shape = (channels, batch_size, height, width)
    for block, weight in zip(blocks, weights, strict=True):
        kernel = tuple(params[block.weight].shape[-2:]) if block.kind == "conv" else (1, 1)
        site = _Site(block, *shape, kernel=kernel)  # type: ignore[arg-type]
        sites.append(site)
        columns.append(site.columns(a))
        u = _product(weight, columns[-1])  # (V, O, N)
        if block.bias is not None:
            u = u + params[block.bias][:, :, None]
        a = _ACTIVATIONS[block.activation](u) if block.activation else u
        outputs.append(a)
        shape = site.output_shape(weight.shape[1])

    # The client's loss: cross-entropy, the mean over each victim's batch.
    probabilities = torch.softmax(outputs[-1], dim=1)  # logits (V, K, B)
    if labels is None:
        label_logits = z[:, input_size:].reshape(victims, batch_size, -1).transpose(1, 2)
        soft = torch.softmax(label_logits, dim=1)
    else:
        soft = torch.zeros_like(probabilities).scatter_(1, labels.reshape(victims, 1, -1), 1.0)
    top = (probabilities - soft) / batch_size  # dCE/dlogits

    # Backward: dCE/da and e = dCE/du of every block, the weight gradients,
    # and their distance to the shared ones (the loss) with its derivative.
    slopes = [
        _slopes(b.activation, o) if b.activation else None
        for b, o in zip(blocks, outputs, strict=True)
    ]
    upstream: list[torch.Tensor] = [top] * count  # dCE/da
    errors: list[torch.Tensor] = [top] * count  # dCE/du
    # dW - G and db - Gb.  The loss's derivative in them is twice that; the
    # adjoint stages are linear in it, so they run on the differences and the
    # factor 2 goes on the result (one small tensor, not every large one).
    residual_w: list[torch.Tensor] = [top] * count
    residual_b: list[torch.Tensor | None] = [None] * count
    loss = z.new_zeros(victims)
    grad_a = top
    for i in range(count - 1, -1, -1):
        block, slope = blocks[i], slopes[i]
        upstream[i] = grad_a
        errors[i] = grad_a * slope[0] if slope is not None else grad_a
        # A last layer of many classes makes these the largest tensors: every
        # extra pass over them costs, hence in place and a norm for the sum.
        difference = _product(errors[i], columns[i].transpose(1, 2))
        difference = difference.sub_(targets[block.weight].flatten(2))
        loss = loss + torch.linalg.vector_norm(difference.flatten(1), dim=1).square()
        residual_w[i] = difference
        if block.bias is not None:
            bias_difference = errors[i].sum(2) - targets[block.bias]
            loss = loss + bias_difference.pow(2).sum(1)
            residual_b[i] = bias_difference
        if i > 0:
            grad_a = sites[i].adjoint(_product(weights[i].transpose(1, 2), errors[i]))

    # Stage A: the backward pass run backwards, first block to last.  `bar_x`
    # is the loss's derivative in x; the derivative in u through the
    # activation's slope is kept for stage B, as is the columns' one.
    bar_u: list[torch.Tensor | None] = [None] * count
    bar_columns: list[torch.Tensor] = [top] * count
    bar_grad_a: torch.Tensor | None = None
    for i, site in enumerate(sites):
        bar_e = _product(residual_w[i], columns[i])
        if residual_b[i] is not None:
            bar_e = bar_e + residual_b[i][:, :, None]  # type: ignore[index]
        if bar_grad_a is not None:  # e[i] made the previous block's dCE/da
            bar_e = bar_e + _product(weights[i], site.columns(bar_grad_a))
        bar_columns[i] = _product(residual_w[i].transpose(1, 2), errors[i])
        slope = slopes[i]
        if slope is not None:
            bar_u[i] = bar_e * upstream[i] * slope[1]
            bar_grad_a = bar_e * slope[0]
        else:
            bar_grad_a = bar_e
    assert bar_grad_a is not None
    # dCE/dlogits = (softmax(logits) - soft) / B, differentiated in both.
    bar_top = bar_grad_a / batch_size
    bar_logits = probabilities * (bar_top - (probabilities * bar_top).sum(1, keepdim=True))

    # Stage B: the forward pass run backwards, last block to first.
    bar_a = bar_logits
    for i in range(count - 1, -1, -1):
        slope = slopes[i]
        bar = bar_a * slope[0] if slope is not None else bar_a
        if bar_u[i] is not None:
            bar = bar + bar_u[i]
        total = bar_columns[i] + _product(weights[i].transpose(1, 2), bar)
        bar_a = sites[i].adjoint(total)

    gradient = bar_a.reshape(victims, channels, batch_size, -1).transpose(1, 2)
    gradient = gradient.reshape(victims, -1)
    if labels is None:
        bar_soft = -bar_top
        bar_label = soft * (bar_soft - (soft * bar_soft).sum(1, keepdim=True))
        gradient = torch.cat((gradient, bar_label.transpose(1, 2).reshape(victims, -1)), 1)
    return loss, 2 * gradient
