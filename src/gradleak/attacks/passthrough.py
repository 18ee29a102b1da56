"""Pass-through convolutions: weights that carry the input up to a trap layer above them.

A dishonest server that may only choose weights (`attacks/imprint.py`) reads back
exactly what its trap layer, the first Linear layer, receives.  When convolutions
sit below that layer, the server sets them to carry the input there, as much of
it as the architecture lets through, and maps what it reads back to an image at
the reduced resolution.  Two families of architecture:

* **strided** (iDLG's LeNet: convolutions with stride, Sigmoid or ReLU, no
  pooling).  Everything below the trap is linear maps and invertible
  activations, so the server plans a linear code: with total stride S and the
  narrowest layer's B channels, it keeps ``r x r`` stride phases per colour
  (the largest r with ``colours * r^2 <= B``) of ``q x q`` block means,
  ``q = S / r``.  The first strided convolutions average ``q x q`` blocks, the
  later ones split the stride phases into channels, stride-1 ones copy.  Each
  layer's affine keeps a Sigmoid in [-2, 2], where it is invertible in float32
  (a ReLU gets a bias that keeps it positive); the decoder inverts the
  activation (logit) and the linear map (pseudo-inverse), layer by layer down.
* **pooled** (Flower's quickstart CNN, gradleak's ConvNet: stride-1
  convolutions, ReLU, max-pooling).  A convolution cannot single out one pixel
  of a pooling window (it is the same at every position), so what survives is
  block maxima: the first convolution copies each colour with a bias that keeps
  it positive through the ReLU, the later ones copy it again, and where a layer
  has channels to spare it adds copies shifted by a multiple of the pooling
  size, whose windows cover rows the unshifted ones miss.  The decoder finds
  each feature's block by probing the crafted layers (index images), subtracts
  the shift, and paints each block with its maximum.  BatchNorm is set to
  ``gamma = 1, beta = 10`` (running statistics 0 and 1): exact in eval mode; in
  train mode the batch's own statistics give every channel one unknown affine
  map, which the decoder estimates from the server's public images (recovery up
  to one affine map per channel, not exact).

The plan also gives ``reduce(x)``: the original reduced the same way (block
means or block maxima, painted back to full size), the reference for "exact".
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.errors import AttackNotApplicable

__all__ = ["PassThroughPlan", "craft_passthrough", "rebuild_passthrough"]

Conv = nn.Conv2d
BIAS_BN = 10.0  # BatchNorm's shift in the crafted layers: keeps standardised values above 0


@dataclass(frozen=True, eq=False)
class Stage:
    """One strided-family layer, restricted to the entries that carry the input."""

    rows: torch.Tensor  # outputs of this layer that carry something (flat indices)
    cols: torch.Tensor  # inputs they read
    matrix: torch.Tensor  # (rows, cols) float64: the linear part
    inverse: torch.Tensor  # its pseudo-inverse
    bias: torch.Tensor  # (rows,) float64


@dataclass(frozen=True, eq=False)
class PassThroughPlan:
    """What the server keeps to map the trap layer's input back to an image."""

    kind: str  # "strided" or "pooled"
    resolution: str  # in words, e.g. "7x7 per colour of 4x4 block maxima"
    input_shape: tuple[int, ...]
    activation: str  # "sigmoid" or "relu"
    stages: tuple[Stage, ...] = ()
    used: torch.Tensor | None = None  # pooled: features that carry a block maximum
    blocks: torch.Tensor | None = None  # (used, 5): colour, row0, row1, col0, col1
    owner: torch.Tensor | None = None  # (C*H*W,): the used feature that paints each pixel
    shift: torch.Tensor | None = None  # feature = slope * maximum + shift (eval mode)
    slope: torch.Tensor | None = None
    fitted: torch.Tensor | None = None  # (used, 2): train-mode BatchNorm, fitted on public data
    batchnorm: bool = False

    def to_json(self) -> dict[str, Any]:
        """What the server keeps of this plan beside the weights it sent (JSON, no tensors but
        the train-mode fit): `rebuild_passthrough` derives the rest from those weights."""
        fitted = None if self.fitted is None else self.fitted.tolist()
        return {
            "kind": self.kind, "resolution": self.resolution, "activation": self.activation,
            "batchnorm": self.batchnorm, "fitted": fitted,
        }  # fmt: skip

    def decode(self, features: torch.Tensor, batchnorm: str = "eval") -> torch.Tensor:
        """Images (full size, painted at the reduced resolution) from trap-layer inputs."""
        f = features.detach().double().reshape(len(features), -1)
        if self.kind == "strided":
            return self._back(f, invert=True)
        v = f[:, self.used]
        if self.batchnorm and batchnorm == "train":
            v = v * self.fitted[:, 0] + self.fitted[:, 1]
        else:
            v = (v - self.shift) / self.slope
        return v[:, self.owner].reshape(len(f), *self.input_shape)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The originals reduced the way the crafted layers reduce them, painted at full size."""
        x = x.detach().double().reshape(len(x), *self.input_shape)
        if self.kind == "strided":
            s = x.reshape(len(x), -1)[:, self.stages[0].cols]
            for stage in self.stages:  # forward through the linear parts only
                s = s @ stage.matrix.T
            return self._back(s, invert=False)
        return _maxima(x, self.blocks)[:, self.owner].reshape(len(x), *self.input_shape)

    def _back(self, s: torch.Tensor, *, invert: bool) -> torch.Tensor:
        if invert:  # the last layer's outputs are the features themselves
            s = s[:, self.stages[-1].rows]
        for stage in reversed(self.stages):
            if invert:
                z = torch.logit(s) if self.activation == "sigmoid" else s
                s = (z - stage.bias) @ stage.inverse.T
            else:
                s = s @ stage.inverse.T
        image = torch.zeros(len(s), _numel(self.input_shape), dtype=torch.float64)
        image[:, self.stages[0].cols] = s
        return image.reshape(len(s), *self.input_shape)


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.tensor(shape).prod())


def _maxima(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(n, used): each block's maximum of its colour."""
    return torch.stack(
        [
            x[:, c, r0 : r1 + 1, c0 : c1 + 1].amax(dim=(1, 2))
            for c, r0, r1, c0, c1 in blocks.tolist()
        ],
        dim=1,
    )


def craft_passthrough(
    model: nn.Module, trap: nn.Linear, public: torch.Tensor
) -> PassThroughPlan | None:
    """Set the convolutions below `trap` (in `model`, in place) to carry the input up to it.

    Returns None when the trap is the first layer with weights (nothing to pass through).

    Raises:
        AttackNotApplicable: Layers this construction does not handle (grouped or
            dilated convolutions, pooling after a strided layer, Sigmoid with max-pooling),
            or crafted layers that fail to carry the public images through (a residual
            connection, a layer it does not model): one line saying which.
    """
    convs, norms, sizes, activation = _layers_below(model, trap, public)
    if not convs:
        return None
    shape = tuple(public.shape[1:])
    if len(shape) != 3:
        raise AttackNotApplicable(f"pass-through convolutions need images (C, H, W), got {shape}")
    pools = [sizes[k][1] // sizes[k + 1][0] for k in range(len(convs))]  # pool factor after each
    strides = [c.stride[0] for c in convs]
    if any(p > 1 for p in pools):
        if any(s > 1 for s in strides) or activation != "relu":
            raise AttackNotApplicable(
                "pass-through with max-pooling needs stride-1 convolutions and ReLU"
            )
        plan = _pooled(model, trap, convs, norms, sizes, pools, public)
    else:
        plan = _strided(convs, norms, sizes, activation, public)
    _check(model, trap, plan, public[:16])
    return plan


@torch.no_grad()
def rebuild_passthrough(
    model: nn.Module, trap_name: str, spec: dict[str, Any], input_shape: tuple[int, ...]
) -> PassThroughPlan:
    """The decoder's plan again, from the crafted weights the server sent and `spec`
    (`PassThroughPlan.to_json`): what a capture's header keeps, without tensors.

    The strided family's linear maps are read off the crafted convolutions, the pooled
    family's blocks probed through them; then the plan must carry random images through
    the model at the stated resolution, as when it was crafted.

    Raises:
        AttackNotApplicable: The weights and `spec` do not make a plan that carries the
            input through (weights or plan changed since the server crafted them).
    """
    crafted = copy.deepcopy(model)  # probing sets eval mode and must not touch the caller's
    trap = crafted.get_submodule(trap_name)
    probe = torch.rand(16, *input_shape, generator=torch.Generator().manual_seed(0))
    convs, norms, sizes, activation = _layers_below(crafted, trap, probe)
    if not convs or activation != spec["activation"]:
        raise _not_passed(f"the model's layers below '{trap_name}' are not the plan's")
    if spec["kind"] == "strided":
        resolution = _strided_resolution(_block(convs, input_shape[0]), input_shape[1])
        if norms or spec["batchnorm"] or resolution != spec["resolution"]:
            raise _not_passed(f"the layers give {resolution} without BatchNorm; not the plan's")
        stages = _restrict([_stage(c, sizes[k][0]) for k, c in enumerate(convs)])
        plan = PassThroughPlan("strided", resolution, input_shape, activation, stages)
    else:
        plan = _probe_blocks(crafted, trap, convs[-1], {}, probe)
        if plan.resolution != spec["resolution"]:
            raise _not_passed(f"the weights give {plan.resolution}, the plan says otherwise")
        fitted = spec.get("fitted")
        fitted = None if fitted is None else torch.tensor(fitted, dtype=torch.float64)
        if bool(norms) != bool(spec["batchnorm"]) or (
            fitted is not None and fitted.shape != (len(plan.used), 2)
        ):
            raise _not_passed("the plan's BatchNorm fit does not match the weights")
        plan = replace(plan, batchnorm=bool(norms), fitted=fitted)
    _check(crafted, trap, plan, probe)
    return plan


def _layers_below(model: nn.Module, trap: nn.Linear, public: torch.Tensor):
    """The convolutions (in call order) below the trap, their BatchNorms, spatial sizes."""
    calls: list[nn.Module] = []
    sizes: dict[nn.Module, tuple[int, int]] = {}
    handles = []
    for module in model.modules():
        if isinstance(module, Conv | nn.modules.batchnorm._BatchNorm | nn.Linear):

            def hook(m, args, out) -> None:
                calls.append(m)
                sizes[m] = (args[0].shape[-1], out.shape[-1])

            handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(public[:2])
    finally:
        for handle in handles:
            handle.remove()
    below = calls[: calls.index(trap)]
    convs = [m for m in below if isinstance(m, Conv)]
    norms: dict[nn.Module, nn.Module] = {}
    for before, after in zip(below, below[1:], strict=False):
        if isinstance(after, nn.modules.batchnorm._BatchNorm):
            if not isinstance(before, Conv):
                raise AttackNotApplicable("pass-through needs every BatchNorm right after a conv")
            norms[before] = after
    for conv in convs:
        if conv.groups != 1 or conv.dilation != (1, 1) or len(set(conv.kernel_size)) != 1:
            raise AttackNotApplicable(
                f"pass-through handles square, ungrouped, undilated convolutions; got {conv}"
            )
    if any(isinstance(m, nn.Linear) for m in below) or len(set(below)) != len(below):
        raise AttackNotApplicable("pass-through needs each layer below the trap called once")
    activation = "relu"
    kinds = {type(m) for m in model.modules()} & {nn.Sigmoid, nn.Tanh, nn.GELU, nn.ELU}
    if kinds == {nn.Sigmoid}:
        activation = "sigmoid"
    elif kinds:
        raise AttackNotApplicable(f"pass-through handles ReLU or Sigmoid, not {kinds.pop()}")
    # Spatial size entering each conv and the trap's, per conv: (in, out) then the next input.
    trap_side = _trap_side(trap, convs[-1]) if convs else 0
    chain = [(sizes[c][0], sizes[c][1]) for c in convs] + [(trap_side, trap_side)]
    return convs, norms, chain, activation


def _trap_side(trap: nn.Linear, last: Conv) -> int:
    side = round((trap.in_features / last.out_channels) ** 0.5)
    if side * side * last.out_channels != trap.in_features:
        raise AttackNotApplicable("the trap layer does not read the last convolution's maps")
    return side


def _affine(activation: str, lo: float, hi: float) -> tuple[float, float]:
    """Scale and shift that keep the activation invertible for inputs in [lo, hi]."""
    if activation == "sigmoid":
        scale = 4.0 / max(hi - lo, 1e-6)
        return scale, -2.0 - scale * lo
    return 1.0, max(0.0, -lo) + 1.0


@torch.no_grad()
def _strided(convs, norms, sizes, activation, public) -> PassThroughPlan:
    if norms:
        raise AttackNotApplicable("pass-through with strided convolutions and BatchNorm")
    colours, height = public.shape[1], public.shape[2]
    q = _block(convs, colours)
    lo, hi = float(public.min()), float(public.max())
    carried, remaining, stages = colours, q, []
    for k, conv in enumerate(convs):
        s, p, size = conv.stride[0], conv.padding[0], conv.kernel_size[0]
        if p + s - 1 >= size:
            raise AttackNotApplicable(f"{conv}: its kernel is smaller than its stride")
        weight = torch.zeros_like(conv.weight)
        scale, shift = _affine(activation, lo, hi)
        if s > 1 and remaining % s == 0 and remaining > 1:  # average s x s blocks
            taps, out, remaining = (
                [(dy, dx) for dy in range(s) for dx in range(s)],
                carried,
                remaining // s,
            )
            for j in range(carried):
                for dy, dx in taps:
                    weight[j, j, p + dy, p + dx] = scale / len(taps)
        else:  # split the stride phases into channels (s = 1: copy)
            out = carried * s * s
            if out > conv.out_channels:
                raise AttackNotApplicable(f"{conv} has too few channels to pass the input on")
            for j in range(carried):
                for phase in range(s * s):
                    weight[j * s * s + phase, j, p + phase // s, p + phase % s] = scale
        conv.weight.copy_(weight)
        if conv.bias is None:
            raise AttackNotApplicable(f"{conv} has no bias to keep its activation invertible")
        conv.bias.zero_()
        conv.bias[:out] = shift
        stages.append(_stage(conv, sizes[k][0]))
        carried = out
        lo, hi = (0.1192, 0.8808) if activation == "sigmoid" else (lo + shift, hi + shift)
    if remaining != 1:
        raise AttackNotApplicable("the strided layers cannot average the blocks this plan needs")
    stages = _restrict(stages)
    resolution = _strided_resolution(q, height)
    return PassThroughPlan("strided", resolution, tuple(public.shape[1:]), activation, stages)


def _block(convs: list[Conv], colours: int) -> int:
    """The side q of the blocks the strided layers average: with total stride S and the
    narrowest layer's B channels, r x r stride phases per colour (the largest r with
    ``colours * r^2 <= B``) of ``q = S / r``."""
    total = int(torch.tensor([c.stride[0] for c in convs]).prod())
    budget = min(c.out_channels for c in convs)
    r = max(f for f in range(1, total + 1) if total % f == 0 and colours * f * f <= budget)
    return total // r


def _strided_resolution(q: int, height: int) -> str:
    what = "means" if q > 1 else "pixels"
    return f"{height // q}x{height // q} per colour of {q}x{q} block {what}"


def _stage(conv: Conv, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The conv's linear part as a dense (out, in) float64 matrix, and its bias per output."""
    n = conv.in_channels * side * side
    basis = torch.eye(n, dtype=torch.float64).reshape(n, conv.in_channels, side, side)
    out = F.conv2d(basis, conv.weight.double(), None, conv.stride, conv.padding)
    matrix = out.reshape(n, -1).T.contiguous()
    bias = conv.bias.double()[:, None].expand(-1, out.shape[-1] * out.shape[-2]).reshape(-1)
    return matrix, bias


def _restrict(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Stage, ...]:
    """Keep, from the top down, the outputs that carry something and the inputs they read."""
    stages: list[Stage] = []
    rows = torch.nonzero(layers[-1][0].abs().sum(1) > 0).squeeze(1)
    for matrix, bias in reversed(layers):
        part = matrix[rows]
        cols = torch.nonzero(part.abs().sum(0) > 0).squeeze(1)
        part = part[:, cols]
        stages.insert(0, Stage(rows, cols, part, torch.linalg.pinv(part), bias[rows]))
        rows = cols
    return tuple(stages)


@torch.no_grad()
def _pooled(model, trap, convs, norms, sizes, pools, public) -> PassThroughPlan:
    colours = public.shape[1]
    carried = colours
    for k, conv in enumerate(convs):
        size, p = conv.kernel_size[0], conv.padding[0]
        n_in, n_out, pool = sizes[k][0], sizes[k][1], pools[k]
        taps = [(size - 1) // 2]  # the centre tap copies
        spare = n_in - pool * (n_out // pool)  # input rows the pooling windows miss
        reach = (min(size - 1 - p, spare) // pool) * pool if pool > 1 else 0
        if reach > 0 and carried * 4 <= conv.out_channels:
            taps = [p, p + reach]  # a second copy, shifted by whole pooling windows
        out = carried * len(taps) ** 2
        if out > conv.out_channels:
            raise AttackNotApplicable(f"{conv} has too few channels to pass the input on")
        weight = torch.zeros_like(conv.weight)
        for j in range(carried):
            for t, (ty, tx) in enumerate((a, b) for a in taps for b in taps):
                weight[j * len(taps) ** 2 + t, j, ty, tx] = 1.0
        conv.weight.copy_(weight)
        if conv.bias is not None:
            conv.bias.zero_()
            if k == 0:
                conv.bias[:out] = max(0.0, -float(public.min())) + 1.0
        elif k == 0 and conv not in norms:
            raise AttackNotApplicable(f"{conv} has no bias to keep the input above zero")
        if conv in norms:
            norm = norms[conv]
            norm.weight.fill_(1.0)
            norm.bias.fill_(BIAS_BN)
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0)
        carried = out
    return _probe_blocks(model, trap, convs[-1], norms, public)


def _front(model: nn.Module, trap: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """What the trap layer receives for `x`, in eval mode."""
    seen: list[torch.Tensor] = []
    handle = trap.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        handle.remove()
        model.train(was)
    return seen[0].reshape(len(x), -1).double()


def _probe_blocks(model, trap: nn.Linear, last: Conv, norms, public) -> PassThroughPlan:
    shape = tuple(public.shape[1:])
    colours, height, width = shape
    index = torch.arange(1, height * width + 1, dtype=torch.float32).reshape(height, width)
    probes = torch.stack([
        torch.zeros(shape),
        torch.ones(shape),
        torch.arange(1, colours + 1, dtype=torch.float32)[:, None, None].expand(shape),
        index.expand(shape),  # the block's maximum is its last pixel
        (height * width + 1 - index).expand(shape),  # ... and here its first
    ])  # fmt: skip
    f = _front(model, trap, probes)
    shift, slope = f[0], f[1] - f[0]
    used = torch.nonzero(slope.abs() > 0.5).squeeze(1)
    read = ((f[2:, used] - shift[used]) / slope[used]).round().long()
    colour, last_pixel, first_pixel = read[0] - 1, read[1] - 1, height * width - read[2]
    blocks = torch.stack([colour, first_pixel // width, last_pixel // width,
                          first_pixel % width, last_pixel % width], dim=1)  # fmt: skip
    area = (blocks[:, 2] - blocks[:, 1] + 1) * (blocks[:, 4] - blocks[:, 3] + 1)
    if bool((area < 1).any()) or bool(((colour < 0) | (colour >= colours)).any()):
        raise _not_passed("a feature reads no block of one colour")
    # Each pixel is painted by the smallest block that holds it (or the nearest block).
    owner = torch.empty(colours, height, width, dtype=torch.long)
    rows = torch.arange(height)[:, None].expand(height, width)
    cols = torch.arange(width)[None, :].expand(height, width)
    for c in range(colours):
        mine = torch.nonzero(blocks[:, 0] == c).squeeze(1)
        if len(mine) == 0:
            raise _not_passed(f"no feature of the trap layer carries colour {c}")
        b = blocks[mine]
        dy = (b[:, 1, None, None] - rows).clamp(min=0) + (rows - b[:, 2, None, None]).clamp(min=0)
        dx = (b[:, 3, None, None] - cols).clamp(min=0) + (cols - b[:, 4, None, None]).clamp(min=0)
        cost = (dy + dx) * 10**6 + area[mine][:, None, None]
        owner[c] = mine[cost.argmin(0)]
    sides = sorted({(int(b[2] - b[1] + 1), int(b[4] - b[3] + 1)) for b in blocks})
    grid = len(torch.unique(blocks[blocks[:, 0] == 0][:, 1]))
    resolution = (
        f"{grid}x{grid} per colour of {sides[0][0]}x{sides[0][1]} block maxima"
        f" (covering {int(blocks[:, 1].min())}..{int(blocks[:, 2].max())})"
    )
    plan = PassThroughPlan(
        "pooled", resolution, shape, "relu", used=used, blocks=blocks,
        owner=owner.reshape(-1), shift=shift[used], slope=slope[used], batchnorm=bool(norms),
    )  # fmt: skip
    if norms:  # train mode: one affine map per feature's channel, fitted on public images
        plan = replace(plan, fitted=_fit_train_mode(model, trap, last, plan, public[:128]))
    return plan


def _fit_train_mode(model, trap, last: Conv, plan: PassThroughPlan, public) -> torch.Tensor:
    """Per used feature, the affine map from its train-mode value to its block maximum.

    In train mode BatchNorm standardises every channel with the batch's statistics: one
    unknown affine map per channel, estimated here on a batch of the server's own images.
    """
    trial = copy.deepcopy(model).train()  # a copy: train mode moves the running statistics
    seen: list[torch.Tensor] = []
    layer = dict(trial.named_modules())[next(n for n, m in model.named_modules() if m is trap)]
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            trial(public)
    finally:
        handle.remove()
    values = seen[0].reshape(len(public), -1).double()[:, plan.used]
    truth = _maxima(public.double(), plan.blocks)
    channel = plan.used // (trap.in_features // last.out_channels)
    fitted = torch.empty(len(plan.used), 2, dtype=torch.float64)
    for ch in channel.unique():
        mine = channel == ch
        a = values[:, mine].reshape(-1, 1)
        a = torch.cat([a, torch.ones_like(a)], 1)
        fitted[mine] = torch.linalg.lstsq(a, truth[:, mine].reshape(-1, 1)).solution.squeeze(1)
    return fitted


def _check(model: nn.Module, trap: nn.Linear, plan: PassThroughPlan, x: torch.Tensor) -> None:
    """Refuse crafted layers that do not carry the server's own images through."""
    error = float(((plan.decode(_front(model, trap, x)) - plan.reduce(x)) ** 2).mean())
    if not error < 1e-8:
        raise _not_passed(f"error {error:.1e} on the server's own images")


def _not_passed(detail: str) -> AttackNotApplicable:
    return AttackNotApplicable(
        f"the crafted convolutions do not pass the input through to the trap layer ({detail}): "
        "an architecture this attack does not model (a residual connection, an operation "
        "between the layers that has no weights to set)"
    )
