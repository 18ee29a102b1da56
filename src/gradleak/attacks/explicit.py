"""The matching objective of plain nets with both derivatives written out.

`stacked_matching` (layered.py) asks autograd for the client's weight
gradient with ``create_graph=True`` and then for that gradient's gradient in
the dummy.  This module computes the same two derivatives by hand, for the
nets `plain_layers` accepts (convolutions and linear layers, each optionally
followed by a sigmoid or tanh, with a flatten before the first linear
layer), for many victims at once, with no autograd graph:

- a convolution runs as one grouped convolution over all victims (each
  victim's weights a group; activations are laid out ``(B, V*C, H, W)``), its
  weight and input gradients as torch's convolution backward, so every
  product of the objective runs in the library's convolution kernels;
- a linear layer never forms its weight gradient: lowrank.py computes its
  part of the distance and of the derivatives from the outer-product
  structure (B-column products with the weights and the shared gradient).

Tests compare it with the vmapped objective to round-off (test_layered.py,
test_lowrank.py); bench/objective.py and bench/flops.py time it.

Notation, per victim: block l maps its input ``a[l-1]`` to pre-activations
``u[l] = W_l * a[l-1] + b_l`` (a convolution or a matrix product) and ``a[l] =
act(u[l])``.  The client's backward pass gives ``e[l] = dCE/du[l]``, the
weight gradient ``dW_l = e[l] (x) a[l-1]`` (the convolution's weight gradient,
or the outer product) and ``db_l = sum e[l]``.  The matching loss is ``sum_l
|dW_l - G_l|^2 + |db_l - Gb_l|^2``; its gradient in the dummy comes from
running the backward pass backwards (stage A, first block to last) and then
the forward pass backwards (stage B, last block to first).  With ``R_l =
dW_l - G_l``: stage A needs ``conv(a[l-1], R_l)`` (a linear layer's ``R h``)
and stage B the input gradient of ``e[l]`` through ``R_l`` (``R^T e``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradleak.attacks.layered import Layer
from gradleak.attacks.lowrank import Matrices, SharedGradient
from gradleak.types import Observation


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


# Convolutions run on channels-last tensors (NHWC in memory): on the 2-core
# CPU the grouped kernels of LeNet's shapes ran 1.1-3.6x faster so than on
# NCHW ones, most for weight gradients and the 1- and 3-channel first layer
# (bench/flops.py times the whole evaluation).
LAYOUT = torch.channels_last


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=LAYOUT)


@dataclass
class _Conv:
    """A convolution block's victims, grouped: weights ``(V*O, C, k, k)``, biases ``(V, O)``.

    Weights and shared weight gradients are kept in the layout of a grouped
    convolution's weight (victim v's filters are rows ``v*O .. v*O + O - 1``).
    """

    block: Block
    victims: int
    weight: torch.Tensor
    bias: torch.Tensor | None
    target: torch.Tensor  # the shared weight gradients, as `weight`
    target_bias: torch.Tensor | None

    def select(self, rows: torch.Tensor) -> _Conv:
        def pick(t: torch.Tensor) -> torch.Tensor:
            per_victim = t.reshape(self.victims, -1, *t.shape[1:])[rows]
            return _channels_last(per_victim.flatten(0, 1))

        bias, target_bias = self.bias, self.target_bias
        return _Conv(
            self.block, len(rows), pick(self.weight), None if bias is None else bias[rows],
            pick(self.target), None if target_bias is None else target_bias[rows],
        )  # fmt: skip

    def per_victim(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor in the weights' layout as ``(V, O, C, k, k)`` (a view)."""
        return t.reshape(self.victims, -1, *t.shape[1:])

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """The block's pre-activations: each victim's convolution and bias."""
        return self.convolve(a, self.weight, self.bias)

    def convolve(
        self, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The grouped convolution of ``a (B, V*C, H, W)`` with each victim's `weight`."""
        return F.conv2d(
            a, weight, None if bias is None else bias.flatten(),
            stride=self.block.stride, padding=self.block.padding, groups=self.victims,
        )  # fmt: skip

    def backward(
        self, e: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, *, data: bool, grad: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Input gradient of ``e`` through `weight` and/or weight gradient of ``(a, e)``."""
        return torch.ops.aten.convolution_backward(
            e, a, weight, None, list(self.block.stride), list(self.block.padding), [1, 1],
            False, [0, 0], self.victims, [data, grad, False],
        )[:2]  # fmt: skip


@dataclass
class _Linear:
    """A linear block's victims: weights through products, the shared gradient's structure."""

    block: Block
    weight: Matrices
    bias: torch.Tensor | None
    shared: SharedGradient
    target_bias: torch.Tensor | None

    def select(self, rows: torch.Tensor) -> _Linear:
        bias, target_bias = self.bias, self.target_bias
        return _Linear(
            self.block, self.weight.select(rows), None if bias is None else bias[rows],
            self.shared.select(rows), None if target_bias is None else target_bias[rows],
        )  # fmt: skip


class ExplicitMatching:
    """The matching objective of V victims of one plain net, prepared once.

    Args:
        blocks: `plain_blocks` of the architecture.
        observations: One per victim (the weights and shared gradients differ).
        dtype: The precision to compute in.
        as_published: Learned labels through the published soft-label
            expression: a victim whose dummy softmax has an entry so small
            that ``target / p`` is not finite gets a NaN loss and gradient,
            as the published ``log(softmax(.))`` gives (matching.py).
    """

    def __init__(
        self,
        blocks: Sequence[Block],
        observations: Sequence[Observation],
        dtype: torch.dtype,
        *,
        as_published: bool = False,
    ) -> None:
        first = observations[0]
        self.blocks = list(blocks)
        self.batch_size = first.batch_size
        self.input_shape = tuple(first.input_shape)
        self.as_published = as_published
        self.layers: list[_Conv | _Linear] = []
        named = [dict(o.model.named_parameters()) for o in observations]
        for block in self.blocks:
            weights = [n[block.weight].detach() for n in named]
            targets = [o.gradient(block.weight) for o in observations]
            bias = target_bias = None
            if block.bias is not None:
                bias = _stack([n[block.bias] for n in named], dtype)
                target_bias = _stack([o.gradient(block.bias) for o in observations], dtype)
            if block.kind == "conv":
                grouped = [
                    _channels_last(_stack(t, dtype).flatten(0, 1)) for t in (weights, targets)
                ]
                self.layers.append(_Conv(
                    block, len(observations), grouped[0], bias, grouped[1], target_bias
                ))  # fmt: skip
            else:
                self.layers.append(_Linear(
                    block, Matrices(weights, dtype), bias,
                    SharedGradient(targets, self.batch_size), target_bias,
                ))  # fmt: skip

    def select(self, rows: torch.Tensor) -> ExplicitMatching:
        """The victims `rows` (indices) only; large weights are shared, not copied."""
        out = ExplicitMatching.__new__(ExplicitMatching)
        out.blocks, out.batch_size = self.blocks, self.batch_size
        out.input_shape, out.as_published = self.input_shape, self.as_published
        out.layers = [layer.select(rows) for layer in self.layers]
        return out

    def __call__(
        self,
        z: torch.Tensor,
        labels: torch.Tensor | None,
        learned: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each victim's matching loss ``(V,)`` and its gradient in ``z`` ``(V, size)``.

        `labels` ``(V, B)`` are known labels, or None when the labels are
        learned: then ``z`` ends with each victim's label logits.  With
        `learned` ``(V,)``, the rows it marks learn theirs and the others
        use `labels`; every row's ``z`` has the logits' room, the known
        rows' unused (their gradient there is zero).
        """
        return _evaluate(self, z, labels, learned)


def _stack(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.stack([t.detach().to(dtype) for t in tensors])


def _to_columns(a: torch.Tensor, victims: int) -> torch.Tensor:
    """A convolution's output ``(B, V*C, H, W)`` as linear inputs ``(V, C*H*W, B)``.

    Each example's features in torch's flatten order; a free view for one example.
    """
    batch = a.shape[0]
    if batch == 1:
        return a.reshape(victims, -1, 1)
    return a.reshape(batch, victims, -1).permute(1, 2, 0)


def _to_images(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Linear inputs' gradient ``(V, F, B)`` back to the convolution layout of `like`."""
    if like.shape[0] == 1:
        return _channels_last(g.reshape(like.shape))
    return _channels_last(g.permute(2, 0, 1).reshape(like.shape))


def _evaluate(
    objective: ExplicitMatching,
    z: torch.Tensor,
    labels: torch.Tensor | None,
    learned: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    layers, batch = objective.layers, objective.batch_size
    victims, count = z.shape[0], len(layers)
    channels = objective.input_shape[0]
    input_size = batch * math.prod(objective.input_shape)
    x = z[:, :input_size].reshape(victims, batch, -1)

    # Forward.  Each block's input is kept (in its own layout): the weight
    # gradient and both adjoint stages use it.
    if isinstance(layers[0], _Conv):
        a = x.transpose(0, 1).reshape(batch, victims * channels, *objective.input_shape[1:])
        a = _channels_last(a)
    else:
        a = x.transpose(1, 2)  # (V, D, B)
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    for layer in layers:
        if isinstance(layer, _Linear):
            if a.dim() == 4:
                a = _to_columns(a, victims)
            inputs.append(a)
            u = layer.weight.times(a)
            if layer.bias is not None:
                u = u + layer.bias[:, :, None]
        else:
            inputs.append(a)
            u = layer.forward(a)
        activation = layer.block.activation
        a = _ACTIVATIONS[activation](u) if activation else u
        outputs.append(a)

    # The client's loss: cross-entropy, the mean over each victim's batch.
    probabilities = torch.softmax(outputs[-1], dim=1)  # logits (V, K, B)
    bad = None
    if labels is None or learned is not None:
        label_logits = z[:, input_size:].reshape(victims, batch, -1).transpose(1, 2)
        soft = torch.softmax(label_logits, dim=1)
        if objective.as_published:
            bad = ~torch.isfinite(soft / batch / probabilities).flatten(1).all(1)
            if learned is not None:
                bad = bad & learned
    if labels is not None:
        known = torch.zeros_like(probabilities).scatter_(1, labels.reshape(victims, 1, -1), 1.0)
        soft = known if learned is None else torch.where(learned[:, None, None], soft, known)
    top = (probabilities - soft) / batch  # dCE/dlogits

    # Backward: dCE/da and e = dCE/du of every block, the weight gradients'
    # distance to the shared ones (the loss), and what the adjoint stages need.
    slopes = [
        _slopes(layer.block.activation, o) if layer.block.activation else None
        for layer, o in zip(layers, outputs, strict=True)
    ]
    upstream: list[torch.Tensor] = [top] * count  # dCE/da
    errors: list[torch.Tensor] = [top] * count  # dCE/du
    # The loss's derivative in dW and db is twice R and rb; the adjoint stages
    # are linear in it, so they run on R and rb and the factor 2 goes on the result.
    residual: list[torch.Tensor] = [top] * count  # conv: R (V, O, C, k, k); linear: R h
    residual_t: list[torch.Tensor | None] = [None] * count  # linear: R^T e
    residual_b: list[torch.Tensor | None] = [None] * count
    loss = z.new_zeros(victims, dtype=torch.float64)
    grad_a = top
    for i in range(count - 1, -1, -1):
        layer, slope = layers[i], slopes[i]
        upstream[i] = grad_a
        e = grad_a * slope[0] if slope is not None else grad_a
        errors[i] = e
        if isinstance(layer, _Linear):
            part, residual[i], residual_t[i] = layer.shared.terms(e, inputs[i])
            loss = loss + part
            bias_sum = e.sum(2)
            if i > 0:
                grad_a = layer.weight.transposed_times(e)
                if isinstance(layers[i - 1], _Conv):
                    grad_a = _to_images(grad_a, outputs[i - 1])
        else:
            data, weight_grad = layer.backward(e, inputs[i], layer.weight, data=i > 0, grad=True)
            difference = weight_grad - layer.target  # type: ignore[operator]
            loss = loss + (difference * difference).sum((1, 2, 3)).reshape(victims, -1).sum(1)
            residual[i] = difference
            bias_sum = e.sum((0, 2, 3)).reshape(victims, -1)
            if i > 0:
                grad_a = data  # type: ignore[assignment]
        if layer.target_bias is not None:
            bias_difference = bias_sum - layer.target_bias
            loss = loss + bias_difference.pow(2).sum(1)
            residual_b[i] = bias_difference

    # Stage A: the backward pass run backwards, first block to last.  `bar_e`
    # is the loss's derivative in e[l]; what goes through the activation's
    # slope into u[l] is kept for stage B.
    bar_u: list[torch.Tensor | None] = [None] * count
    bar_grad_a: torch.Tensor | None = None  # the derivative in the previous block's dCE/da
    for i, layer in enumerate(layers):
        rb = residual_b[i]
        if isinstance(layer, _Linear):
            bar_e = residual[i]
            if rb is not None:
                bar_e = bar_e + rb[:, :, None]
            if bar_grad_a is not None:  # e[i] made the previous block's dCE/da
                if bar_grad_a.dim() == 4:
                    bar_grad_a = _to_columns(bar_grad_a, victims)
                bar_e = bar_e + layer.weight.times(bar_grad_a)
        else:
            bar_e = layer.convolve(inputs[i], residual[i], rb)
            if bar_grad_a is not None:
                bar_e = bar_e + layer.convolve(bar_grad_a, layer.weight)
        slope = slopes[i]
        if slope is not None:
            bar_u[i] = bar_e * upstream[i] * slope[1]
            bar_grad_a = bar_e * slope[0]
        else:
            bar_grad_a = bar_e
    assert bar_grad_a is not None
    # dCE/dlogits = (softmax(logits) - soft) / B, differentiated in both.
    bar_top = bar_grad_a / batch
    bar_logits = probabilities * (bar_top - (probabilities * bar_top).sum(1, keepdim=True))

    # Stage B: the forward pass run backwards, last block to first.
    bar_a = bar_logits
    for i in range(count - 1, -1, -1):
        layer, slope = layers[i], slopes[i]
        bar = bar_a * slope[0] if slope is not None else bar_a
        if bar_u[i] is not None:
            bar = bar + bar_u[i]
        if isinstance(layer, _Linear):
            bar_a = residual_t[i] + layer.weight.transposed_times(bar)  # type: ignore[operator]
            if i > 0 and isinstance(layers[i - 1], _Conv):
                bar_a = _to_images(bar_a, outputs[i - 1])
        else:
            through_w, _ = layer.backward(bar, inputs[i], layer.weight, data=True, grad=False)
            through_r, _ = layer.backward(errors[i], inputs[i], residual[i], data=True, grad=False)
            bar_a = through_w + through_r  # type: ignore[operator]

    if bar_a.dim() == 4:
        gradient = bar_a.reshape(batch, victims, -1).transpose(0, 1).reshape(victims, -1)
    else:
        gradient = bar_a.transpose(1, 2).reshape(victims, -1)
    if labels is None or learned is not None:
        bar_soft = -bar_top
        bar_label = soft * (bar_soft - (soft * bar_soft).sum(1, keepdim=True))
        if learned is not None:  # known labels are no variable: nothing moves there
            bar_label = bar_label * learned[:, None, None]
        gradient = torch.cat((gradient, bar_label.transpose(1, 2).reshape(victims, -1)), 1)
    loss, gradient = loss.to(z.dtype), 2 * gradient
    if bad is not None and bool(bad.any()):
        loss = torch.where(bad, math.nan, loss)
        gradient = torch.where(bad[:, None], math.nan, gradient)
    return loss, gradient
