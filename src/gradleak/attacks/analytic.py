"""A closed-form warm start for sigmoid conv nets: read the input back layer by layer.

For a single example and a network ``x -> [conv -> sigmoid] * L -> flatten ->
Linear``, the shared gradient determines the input through linear equations
(the idea of R-GAP, Zhu & Blaschko, "R-GAP: Recursive Gradient Attack on
Privacy", ICLR 2021; this is our own formulation):

- The last layer's gradients are ``dW = delta h^T`` and ``db = delta``, so its
  input features come out exactly: ``h = dW[c] / db[c]`` for the label c.
- Going down, each conv layer has two sets of equations in its unknown input
  ``a``: its forward pass, ``conv(a) = logit(a_out) - b`` (the output is known
  from the layer above), and its weight gradient, ``dW = corr(a, delta_out)``
  (``delta_out`` is known from the layer above too).  Both are linear in
  ``a``; we solve them in the least-squares sense with CGLS, matrix-free, for
  all victims at once, and pass ``delta`` down through the sigmoid.  Each
  forward equation is weighted by its sigmoid's slope ``a_out (1 - a_out)``:
  the client computed in float32, so an output near 0 or 1 pins its
  pre-activation down poorly, and unweighted it spoiled the whole solve.

On iDLG's LeNet this lands within MSE ~1e-5 of the private MNIST image before a
single gradient-matching step; on CIFAR-100 the conv systems are worse
conditioned and the start is rougher.  Either way the gradient-matching
attack then starts next to the answer instead of from noise.  The attack only
uses what it always sees: the model's weights and the shared gradient.

Anything else (no bias on the last layer, other layer types, a batch, a
non-finite result) gives None for that victim, and the attack starts as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from gradleak.attacks.lowrank import transposed_times
from gradleak.types import Observation

_EPS = 1e-6  # keeps logit() finite where a solved activation reaches 0 or 1
# CGLS stops once |A^T r|^2 falls below this share of its start (the
# preconditioned one): on 32 CIFAR-100 and 16 LFW and MNIST victims each start
# then matched the shared gradient within the improved attack's tolerance, at
# about two thirds of the iterations 1e-14 took.
_CGLS_FLOOR = 1e-12
# The exact solve reads a layer's input from its weight gradient alone where
# that fixes it.  The float32 gradient's rounding then passes through the
# system's conditioning: on 13 of 300 LFW victims (`reproduce idlg --mode
# improved --seed 1`) the input came out 1e-3 off and the start 1e4 times
# further from the image than usual, which L-BFGS then took up to 343
# evaluations to make up.  Those inputs broke the layer's forward equations
# (relative residual 2.6e-4 to 1.2e-3, against 6e-6 to 5.4e-5 on the rest), so a
# residual above this sends the victim to CGLS, which weighs both sets.
_EXACT_RESIDUAL = 1e-4


@dataclass(frozen=True)
class _Conv:
    weight: str  # parameter names
    bias: str | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    in_shape: tuple[int, ...]  # one example, without the batch dimension


@dataclass(frozen=True)
class _Chain:
    convs: tuple[_Conv, ...]
    fc_weight: str
    fc_bias: str
    feature_shape: tuple[int, ...]  # output of the last conv


def sigmoid_conv_chain(observation: Observation) -> _Chain | None:
    """The layer structure the closed form needs, or None if the model has another."""
    model = observation.model
    names = {id(p): n for n, p in model.named_parameters()}
    leaves = [m for m in model.modules() if not list(m.children())]
    convs: list[_Conv] = []
    shape = tuple(observation.input_shape)
    for i, module in enumerate(leaves[:-1]):
        if isinstance(module, nn.Conv2d):
            follows = leaves[i + 1]
            plain = module.groups == 1 and module.dilation == (1, 1)
            if not (
                plain and isinstance(follows, nn.Sigmoid) and isinstance(module.padding, tuple)
            ):
                return None
            bias = names[id(module.bias)] if module.bias is not None else None
            convs.append(
                _Conv(names[id(module.weight)], bias, module.stride, module.padding, shape)
            )
            with torch.no_grad():
                weight = module.weight.detach()
                probe = weight.new_zeros(1, *shape)
                out = F.conv2d(probe, weight, stride=module.stride, padding=module.padding)
                shape = tuple(out.shape[1:])
        elif not isinstance(module, nn.Sigmoid | nn.Flatten):
            return None
    fc = leaves[-1]
    if not convs or not isinstance(fc, nn.Linear) or fc.bias is None:
        return None
    if fc.in_features != torch.Size(shape).numel():
        return None
    return _Chain(tuple(convs), names[id(fc.weight)], names[id(fc.bias)], shape)


def analytic_inputs(
    observations: Sequence[Observation],
    labels: torch.Tensor | None,
    *,
    iterations: int = 1500,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor | None:
    """Closed-form estimates of every victim's input, shape ``(V, *input_shape)``.

    Args:
        observations: Single-example observations of one architecture.
        labels: The label of each victim, or None to read it here from the
            last layer's bias gradient (its one negative entry, as iDLG does).
        iterations: CGLS iterations per layer at most.
        dtype: Precision to solve in.

    Returns:
        The estimates (rows that came out non-finite are NaN), or None when
        the architecture or batch size does not fit the closed form.
    """
    chain = sigmoid_conv_chain(observations[0])
    if chain is None or any(o.batch_size != 1 for o in observations):
        return None
    names = list(observations[0].parameter_names)
    conv_names = [n for c in chain.convs for n in (c.weight, c.bias) if n is not None]
    # Only the conv layers are stacked: a last layer of 5,749 classes (LFW) is
    # gigabytes per 64 victims, so its part is done one victim at a time.
    params = {
        n: torch.stack([dict(o.model.named_parameters())[n].detach() for o in observations]).to(
            dtype
        )
        for n in conv_names
    }
    grads = {n: torch.stack([o.gradients[names.index(n)] for o in observations]).to(dtype)
             for n in conv_names}  # fmt: skip
    features, errors = [], []
    for k, o in enumerate(observations):
        gb = o.gradients[names.index(chain.fc_bias)].to(dtype)
        gw = o.gradients[names.index(chain.fc_weight)]
        c = int(gb.argmin()) if labels is None else int(labels.reshape(-1)[k])
        weight = dict(o.model.named_parameters())[chain.fc_weight].detach()
        # Features before the last layer, and the error signal arriving at them:
        # one row of the weight gradient, and W^T gb converted a block of rows at
        # a time (no float64 copy of LFW's 5,749 x 768 layer).
        features.append(gw[c].to(dtype) / gb[c])
        errors.append(transposed_times(weight, gb[:, None])[:, 0])
    a = torch.stack(features).reshape(-1, *chain.feature_shape)
    delta = torch.stack(errors).reshape_as(a) * a * (1 - a)
    for depth, conv in reversed(list(enumerate(chain.convs))):
        target = _logit(a)
        if conv.bias is not None:
            target = target - params[conv.bias].reshape(-1, params[conv.bias].shape[1], 1, 1)
        a_in = _solve(conv, params[conv.weight], delta, target, _trust(a), grads[conv.weight],
                      iterations, exact=depth > 0)  # fmt: skip
        if depth == 0:
            return a_in
        a_in = a_in.clamp(_EPS, 1 - _EPS)
        back = vmap(
            lambda w, d, c=conv: F.grad.conv2d_input(
                (1, *c.in_shape), w, d[None], stride=c.stride, padding=c.padding
            )
        )
        delta = back(params[conv.weight], delta)[:, 0] * a_in * (1 - a_in)
        a = a_in
    return None  # unreachable: the loop returns at depth 0


class ClosedFormCache:
    """Closed-form starts computed once for several attacks on the same victims.

    DLG's closed form reads each victim's label from the last bias gradient,
    iDLG's label rule reads the same label from the weight gradient; where
    they agree the two starts are the same numbers, so `gradleak reproduce`
    computes them once per group for both methods.
    """

    def __init__(self) -> None:
        self._starts: dict[tuple, torch.Tensor | None] = {}

    def inputs(
        self,
        observations: Sequence[Observation],
        labels: torch.Tensor | None,
        *,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """`analytic_inputs(observations, labels, dtype=dtype)`, computed at most once."""
        chain = sigmoid_conv_chain(observations[0])
        if chain is None or any(o.batch_size != 1 for o in observations):
            return None
        if labels is None:  # the label analytic_inputs would read
            names = list(observations[0].parameter_names)
            at = names.index(chain.fc_bias)
            labels = torch.tensor([int(o.gradients[at].argmin()) for o in observations])
        key = (tuple(id(o) for o in observations), tuple(labels.reshape(-1).tolist()), dtype)
        if key not in self._starts:
            self._starts[key] = analytic_inputs(observations, labels, dtype=dtype)
        return self._starts[key]


def analytic_label_logits(
    observation: Observation, *, sharpness: float = 30.0
) -> torch.Tensor | None:
    """Soft-label logits that start where the closed-form input was solved.

    The last layer's bias gradient is ``softmax - onehot``: negated,
    normalised and sharpened, its softmax is nearly the one-hot label.  Where DLG's dummy
    input starts from the closed form (which read the label this way), its
    dummy label starts consistent with it, rather than at random; otherwise
    the first steps would drag the input away from the answer.  None where
    the closed form does not apply.
    """
    chain = sigmoid_conv_chain(observation)
    if chain is None or observation.batch_size != 1:
        return None
    names = list(observation.parameter_names)
    bias_gradient = observation.gradients[names.index(chain.fc_bias)]
    # Scaled so the label's logit is `sharpness` above zero however confident the
    # model is (a confident model's whole bias gradient is tiny).
    scale = bias_gradient.abs().amax().clamp_min(1e-30)
    return -sharpness * bias_gradient.reshape(1, -1) / scale


def _logit(a: torch.Tensor) -> torch.Tensor:
    a = a.clamp(_EPS, 1 - _EPS)
    return torch.log(a) - torch.log1p(-a)


def _trust(a: torch.Tensor) -> torch.Tensor:
    """How far each forward equation ``conv(a_in) = logit(a) - b`` can be trusted, in (0, 1].

    An error in ``a`` comes out of ``logit`` multiplied by ``1 / (a (1 - a))``:
    a sigmoid output near 0 or 1 (one the client's float32 may have rounded to
    exactly 1) gives a pre-activation that is off by far more than the rest.
    Weighting each equation by ``a (1 - a)`` makes every row's error the size
    of the error in ``a``; normalised per victim so that its best rows weigh 1
    against the weight-gradient equations, as before.
    """
    clamped = a.clamp(_EPS, 1 - _EPS)
    weight = clamped * (1 - clamped)
    return weight / weight.flatten(1).amax(1).reshape(-1, *([1] * (a.dim() - 1)))


def _solve(
    conv: _Conv,
    weight: torch.Tensor,
    delta: torch.Tensor,
    target: torch.Tensor,
    trust: torch.Tensor,
    weight_gradient: torch.Tensor,
    iterations: int,
    *,
    exact: bool,
) -> torch.Tensor:
    """Every victim's layer input: exactly where that is cheap, else by CGLS.

    `trust` weighs the forward equations (`_trust`), the same shape as `target`.
    """
    found = [None] * len(weight)
    if exact:
        per_victim = zip(weight, delta, target, trust, weight_gradient, strict=True)
        found = [_solve_exact(conv, *one) for one in per_victim]
    missing = [i for i, a in enumerate(found) if a is None]
    if missing:
        rows = torch.tensor(missing, device=weight.device)
        solved = _solve_layer(conv, weight[rows], delta[rows], target[rows], trust[rows],
                              weight_gradient[rows], iterations)  # fmt: skip
        for i, a in zip(missing, solved, strict=True):
            found[i] = a
    return torch.stack(found)


def _solve_layer(
    conv: _Conv,
    weight: torch.Tensor,
    delta: torch.Tensor,
    target: torch.Tensor,
    trust: torch.Tensor,
    weight_gradient: torch.Tensor,
    iterations: int,
) -> torch.Tensor:
    """Least-squares input of one conv layer from its forward and weight-gradient equations.

    CGLS (conjugate gradients on the normal equations), one vmapped
    iteration per loop pass over the victims that have not converged yet.
    The forward rows are weighted by `trust`, the weight-gradient rows scaled
    by ``1 / max|delta|`` so that both sets of equations weigh alike.
    """
    scale = 1.0 / delta.flatten(1).abs().amax(1).clamp_min(1e-30)

    def operator(a, w, d, s, t):  # one victim: a -> [t * conv(a); s * corr(a, d)]
        a = a[None]
        forward = t * F.conv2d(a, w, stride=conv.stride, padding=conv.padding)[0]
        corr = F.grad.conv2d_weight(a, w.shape, d[None], stride=conv.stride, padding=conv.padding)
        return torch.cat([forward.flatten(), s * corr.flatten()])

    def adjoint(w, d, s, t, r):  # the transpose of `operator`, written out
        split = r.numel() - w.numel()
        forward, corr = r[:split].reshape(-1, *d.shape[1:]), r[split:].reshape(w.shape)
        shape = (1, *conv.in_shape)
        through_w = F.grad.conv2d_input(shape, w, (t * forward)[None], stride=conv.stride,
                                        padding=conv.padding)  # fmt: skip
        through_d = F.grad.conv2d_input(shape, corr, d[None], stride=conv.stride,
                                        padding=conv.padding)  # fmt: skip
        return (through_w + s * through_d)[0]

    def column_norms(w, d, s, t):  # |each column of `operator`|: Jacobi preconditioner
        shape = (1, *conv.in_shape)
        forward = F.grad.conv2d_input(shape, w * w, (t * t)[None], stride=conv.stride,
                                      padding=conv.padding)  # fmt: skip
        corr = F.grad.conv2d_input(shape, torch.ones_like(w), (d * d)[None], stride=conv.stride,
                                   padding=conv.padding)  # fmt: skip
        return (forward + s * s * corr)[0].sqrt()

    # CGLS on y with x = D y, D the inverse column norms: columns of very
    # different size (border pixels, rows of little trust) slow plain CGLS down.
    precondition = 1.0 / vmap(column_norms)(weight, delta, scale, trust).clamp_min(1e-150)
    apply, pull_back = vmap(operator), vmap(adjoint)
    rhs = torch.cat([(trust * target).flatten(1), scale[:, None] * weight_gradient.flatten(1)],
                    dim=1)  # fmt: skip
    y = 0.5 / precondition  # x = 0.5 everywhere: mid-grey
    r = rhs - apply(precondition * y, weight, delta, scale, trust)
    s = precondition * pull_back(weight, delta, scale, trust, r)
    p, gamma = s, s.flatten(1).pow(2).sum(1)
    floor = gamma * _CGLS_FLOOR
    out = torch.empty_like(y)  # each victim's row is written when it leaves or at the end
    rows = torch.arange(len(weight), device=weight.device)  # the victims still iterating
    for _ in range(iterations):
        live = gamma > floor
        if not bool(live.all()):  # converged victims leave, so each costs only its own
            out[rows[~live]] = (precondition * y)[~live]
            keep = live.nonzero().flatten()
            if keep.numel() == 0:
                return out
            rows, y, r, p, gamma, floor = (t[keep] for t in (rows, y, r, p, gamma, floor))
            weight, delta, scale, trust = weight[keep], delta[keep], scale[keep], trust[keep]
            precondition = precondition[keep]
        q = apply(precondition * p, weight, delta, scale, trust)
        alpha = gamma / q.pow(2).sum(1).clamp_min(1e-300)
        y = y + _col(alpha, y) * p
        r = r - alpha[:, None] * q
        s = precondition * pull_back(weight, delta, scale, trust, r)
        fresh = s.flatten(1).pow(2).sum(1)
        p = s + _col(fresh / gamma.clamp_min(1e-300), s) * p
        gamma = fresh
    out[rows] = precondition * y
    return out


def _solve_exact(
    conv: _Conv,
    weight: torch.Tensor,
    delta: torch.Tensor,
    target: torch.Tensor,
    trust: torch.Tensor,
    weight_gradient: torch.Tensor,
) -> torch.Tensor | None:
    """One victim's layer input, exactly, when the weight gradient leaves few unknowns.

    The weight-gradient equations split by input channel and share one matrix
    (it depends on delta alone): per channel they fix the input up to that
    matrix's null space.  The forward equations then fix the few remaining
    coefficients.  Returns None where the null space is too large for a
    small dense solve (the input layer, typically), the result is not finite, or
    it breaks the forward equations by more than `_EXACT_RESIDUAL`.
    """
    channels, height, width = conv.in_shape
    pixels = height * width
    basis = torch.eye(pixels, dtype=weight.dtype, device=weight.device)
    basis = basis.reshape(pixels, 1, 1, height, width)
    shape = (weight.shape[0], 1, *weight.shape[2:])

    def correlate(image: torch.Tensor) -> torch.Tensor:
        return F.grad.conv2d_weight(image, shape, delta[None], stride=conv.stride,
                                    padding=conv.padding).flatten()  # fmt: skip

    matrix = vmap(correlate)(basis).T  # (out * kh * kw, pixels), the same for every channel
    u, sv, vh = torch.linalg.svd(matrix, full_matrices=True)
    rank = int((sv > sv[0] * 1e-10).sum())
    if (pixels - rank) * channels > 1024:
        return None
    rhs = weight_gradient.transpose(0, 1).reshape(channels, -1).T  # (out * kh * kw, channels)
    particular = vh[:rank].T @ ((u[:, :rank].T @ rhs) / sv[:rank, None])  # (pixels, channels)
    a = particular.T.reshape(conv.in_shape)
    null = vh[rank:]  # (k, pixels)
    if len(null):
        # Unknown coefficients c[channel, j]: forward(a + sum c N_j in that channel) = target.
        images = torch.zeros(channels, len(null), channels, pixels, dtype=a.dtype, device=a.device)
        for c in range(channels):
            images[c, :, c] = null
        images = images.reshape(-1, 1, *conv.in_shape)
        columns = vmap(lambda im: F.conv2d(im, weight, stride=conv.stride,
                                           padding=conv.padding).flatten())(images)  # fmt: skip
        residual = target - F.conv2d(a[None], weight, stride=conv.stride, padding=conv.padding)[0]
        rows = trust.flatten()[:, None]  # the forward equations, weighted as in CGLS
        coefficients = torch.linalg.lstsq(rows * columns.T, rows * residual.flatten()[:, None])
        coefficients = coefficients.solution
        a = a + (coefficients.reshape(channels, len(null)) @ null).reshape(conv.in_shape)
    if not bool(torch.isfinite(a).all()):
        return None
    forward = F.conv2d(a[None], weight, stride=conv.stride, padding=conv.padding)[0]
    residual = (trust * (forward - target)).norm() / (trust * target).norm().clamp_min(1e-300)
    return a if float(residual) <= _EXACT_RESIDUAL else None


def _col(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))
