"""Label inference from the shared gradient, as pure functions.

iDLG's observation: for one example with cross-entropy over a one-hot label,
the gradient of the last Linear layer's weight row i is
``(softmax_i - y_i) * h``, where ``h`` are the layer's input features.  When
those features are non-negative (post-Sigmoid, post-ReLU) every row has the
sign of ``softmax_i - y_i``, which is negative only for the true class.  So the
label is the row whose sum is the most negative.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from gradleak.errors import AttackNotApplicable
from gradleak.types import ClientOptimizer, Observation, UpdateObservation


def last_linear_weight(model: nn.Module) -> str:
    """Name of the weight of the model's last Linear layer.

    Raises:
        AttackNotApplicable: The model has no Linear layer.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise AttackNotApplicable(
            "the iDLG label rule needs a final Linear layer and this model has none; "
            "use --method dlg, which learns the label"
        )
    return f"{names[-1]}.weight" if names[-1] else "weight"


def idlg_label_from_weight_gradient(weight_gradient: torch.Tensor) -> int:
    """iDLG's rule on the gradient of the last layer's weight, ``(classes, features)``."""
    return int(weight_gradient.sum(dim=1).argmin())


def idlg_label(observation: Observation) -> int:
    """The true label of a single-example observation, by iDLG's rule.

    Raises:
        AttackNotApplicable: No final Linear layer, or more than one example.
    """
    if observation.batch_size != 1:
        raise AttackNotApplicable(
            f"the iDLG label rule reads the label of one example, but this gradient "
            f"averages {observation.batch_size}; use --batch-size 1 or --method dlg"
        )
    weight = observation.gradient(last_linear_weight(observation.model))
    if weight.shape[0] != observation.num_classes:
        raise AttackNotApplicable(
            f"the last Linear layer has {weight.shape[0]} outputs, not the "
            f"{observation.num_classes} classes; the iDLG label rule does not apply"
        )
    return idlg_label_from_weight_gradient(weight)


# --- Batches -----------------------------------------------------------------
#
# For a batch of B examples and the mean cross-entropy, the last layer's bias
# gradient is  g_b[c] = (S_c - n_c) / B,  where n_c counts the examples of
# class c and S_c = sum_i softmax_i[c] is the probability mass the model puts
# on c over the batch.  An absent class has g_b[c] = S_c / B > 0, so every
# class with a negative bias gradient is in the batch (a proof, not a
# heuristic).  Counts follow from  n_c = S_c - B g_b[c]  once S_c is known;
# the attacker estimates it from the model and the gradient alone:
#
# * For an absent class the weight-gradient row is  g_W[c] = sum_i p_ic h_i / B,
#   a positive combination of the examples' features.  Pooling the rows and
#   bias entries of the classes with a positive bias gradient gives a
#   probability-weighted mean feature  h = sum g_W[c] / sum g_b[c].
# * The model's softmax at that feature, times B, estimates S; the counts are
#   then rounded to whole numbers that sum to B, keeping every
#   negative-gradient class at least once.
# * A class with a positive bias gradient can still be present (the model
#   puts more than its count of mass on it); once the counts say so, it leaves
#   the pool of the first step and the estimate is made again.
#
# The estimate is exact when every example's softmax is the same; it is off by
# sum_i p_ic - B softmax(W h + b)_c otherwise.


def last_linear_layer(model: nn.Module) -> tuple[str, str | None]:
    """Names of the weight and bias (None without one) of the model's last Linear layer.

    Raises:
        AttackNotApplicable: The model has no Linear layer.
    """
    weight = last_linear_weight(model)
    module = model.get_submodule(weight.rsplit(".", 1)[0] if "." in weight else "")
    if getattr(module, "bias", None) is None:
        return weight, None
    return weight, weight[: -len("weight")] + "bias"


def batch_label_counts_from_gradients(
    weight_gradient: torch.Tensor,
    bias_gradient: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """How many examples of each class the batch holds, from the last layer alone.

    Args:
        weight_gradient: Shared gradient of the last Linear weight, ``(classes, features)``.
        bias_gradient: Shared gradient of its bias, ``(classes,)``.
        weight: The layer's weight (the attacker sent the model), ``(classes, features)``.
        bias: The layer's bias, ``(classes,)``.
        batch_size: B, the number of examples the gradient averages over.

    Returns:
        Integer counts, ``(classes,)``, summing to `batch_size`.

    When exactly B classes have a negative bias gradient the answer is exact
    (each of them once): a proof.  Otherwise (repeated labels, or a present
    class the model already favours so much that its sign is positive) it is
    an estimate (see the module notes).  Measured with iDLG's protocol (a
    fresh uniform-init LeNet per batch, random test images; the protocol of
    tests/test_batch.py), the multiset was exact on 500 of 500 batches for
    each of MNIST and CIFAR-100, B = 2..8, distinct labels and labels with
    at least one repeat (14,000 batches).  Without the second pass (pool
    refinement) MNIST fell to 99.4-99.8% at several B.  It can fail when the
    examples' softmax outputs differ a lot, e.g. trained models.
    """
    gw, gb = weight_gradient.double(), bias_gradient.double()
    present = gb < 0
    if int(present.sum()) == batch_size:
        return present.long()
    if int(present.sum()) > batch_size:
        raise AttackNotApplicable(
            f"{int(present.sum())} classes have a negative bias gradient, more than the "
            f"batch size {batch_size}: is --batch-size right, and the loss a mean cross-entropy?"
        )
    # Pool the classes with a positive bias gradient for the feature estimate.
    # A class then found present despite its positive sign (the model puts
    # more than its count of mass on it) is not a positive combination of
    # features: drop it from the pool and estimate again.
    absent = gb > 0
    for _ in range(batch_size):
        softmax = estimated_softmax(gw, gb, weight.double(), bias.double(), absent=absent)
        counts = _round_counts(batch_size * (softmax - gb), present, batch_size)
        hidden = absent & (counts > 0)
        if not bool(hidden.any()) or bool(hidden.sum() == absent.sum()):
            break
        absent = absent & ~hidden
    return counts


# --- Confident models: the logits fitted per example --------------------------
#
# The rule above assumes that every example's softmax is about the same.  A
# trained model breaks that: each example puts most of its mass on its own
# class, a present class can then have a positive bias gradient (the others'
# mass on it outweighs its own small error) and a repeated class looks like a
# single one.  What still holds exactly, for any model: with z_i the examples'
# logits, e_i = softmax(z_i) - y_i, B g_W = sum_i e_i h_i^T and
# z_i = W h_i + b, so
#
#     B (g_W W^T + g_b b^T) = sum_i e_i z_i^T      (classes x classes)
#     B g_b                 = sum_i e_i
#
# a system in the B logit vectors alone, which the attacker can form from the
# last layer.  For each candidate label multiset (every class with a negative
# bias gradient at least once, the rest of the batch any classes) the logits
# are fitted by Adam from two starts (confident one-hot logits, and the logits
# at the pooled feature of the rule above); the multiset whose fit leaves the
# smallest residual wins, but only by a clear margin over the rule's own
# answer (`MARGIN` of its residual), so that a fit that has not converged
# cannot overturn a right answer.  Measured on a ConvNet trained on MNIST
# (97.7%, 20 random held-out batches each): B = 4 exact 13/20 in eval mode
# (the rule 3/20); at a margin of 0.5: B = 2 20/20 (15/20), B = 4 train mode
# 14/20 (2/20), B = 8 1/20 (0/20).  On iDLG's untrained LeNet, B = 8: 20/20,
# as the rule (18/20 at a margin of 0.5).  The candidates grow combinatorially: beyond
# `max_hypotheses` the rule's answer stands.


MARGIN = 0.2  # the fit must beat the rule's answer by this factor (0.5 let 2 of 20 wrong through)


def fitted_label_counts(
    weight_gradient: torch.Tensor,
    bias_gradient: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    batch_size: int,
    counts: torch.Tensor,
    *,
    steps: int = 3000,
    max_hypotheses: int = 2000,
) -> torch.Tensor:
    """`counts` (the rule's answer) replaced by the label multiset whose logits fit best.

    See the notes above.  Returns integer counts, ``(classes,)``, summing to
    `batch_size`; `counts` itself when every class with a negative bias
    gradient is the whole batch (the rule is then a proof) or when there are
    more candidates than `max_hypotheses`.
    """
    gw, gb = weight_gradient.double().cpu(), bias_gradient.double().cpu()
    w, b = weight.double().cpu(), bias.double().cpu()
    classes = gb.numel()
    present = (gb < 0).nonzero().flatten().tolist()
    extra = batch_size - len(present)
    if extra <= 0:
        return counts
    pool = list(range(classes))
    if math.comb(classes + extra - 1, extra) > max_hypotheses:
        pool = present
        if math.comb(len(pool) + extra - 1, extra) > max_hypotheses:
            return counts
    rule = torch.repeat_interleave(torch.arange(classes), counts.cpu()).tolist()
    hypotheses = [
        sorted(present + list(c)) for c in itertools.combinations_with_replacement(pool, extra)
    ]
    if rule not in hypotheses:
        hypotheses.append(rule)
    target = batch_size * (gw @ w.T + gb[:, None] * b[None, :])
    sums = batch_size * gb
    absent = gb > 0
    feature = (
        gw[absent].sum(0) / gb[absent].sum() if bool(absent.any()) else torch.zeros(w.shape[1])
    )
    starts = (None, w @ feature.to(w) + b)
    residual = torch.minimum(
        *(_logit_fit(target, sums, hypotheses, classes, start, steps) for start in starts)
    )
    best = int(residual.argmin())
    if float(residual[best]) < MARGIN * float(residual[hypotheses.index(rule)]):
        chosen = torch.tensor(hypotheses[best])
        return torch.bincount(chosen, minlength=classes).to(counts)
    return counts


def _logit_fit(
    target: torch.Tensor,
    sums: torch.Tensor,
    hypotheses: list[list[int]],
    classes: int,
    start: torch.Tensor | None,
    steps: int,
) -> torch.Tensor:
    """Each hypothesis' residual after fitting its B logit vectors, ``(hypotheses,)``."""
    y = torch.nn.functional.one_hot(torch.tensor(hypotheses), classes).double()
    # Seeded noise breaks the tie between examples of one class, which would
    # otherwise get equal gradients and never part.
    # The same draw for every hypothesis, so that each one's fit does not depend on
    # which others are tried beside it.
    noise = torch.randn(
        y.shape[1:], generator=torch.Generator().manual_seed(0), dtype=torch.double
    ).expand(y.shape)
    z = (10 * y + noise) if start is None else (start + 0.1 * noise)
    z.requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=0.1)
    # A fixed step: decaying it (ten times smaller for the last half) lowered the
    # wrong multisets' residuals as much as the right one's and read fewer batches
    # right (B = 4, 20 batches: eval 10 against 11, train 13 against 15).
    scale_t, scale_s = (target**2).sum(), (sums**2).sum().clamp_min(1e-300)
    with torch.enable_grad():
        for _ in range(steps):
            e = torch.softmax(z, -1) - y
            residual = ((e.transpose(1, 2) @ z - target) ** 2).sum((1, 2)) / scale_t + (
                (e.sum(1) - sums) ** 2
            ).sum(-1) / scale_s
            optimizer.zero_grad()
            residual.sum().backward()
            optimizer.step()
    return residual.detach()


def _round_counts(estimate: torch.Tensor, present: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Whole counts summing to `batch_size`, each `present` class at least once.

    Largest remainder: the missing examples go one at a time to the class
    whose estimate is furthest above its count.
    """
    counts = present.long()
    for _ in range(batch_size - int(counts.sum())):
        counts[int((estimate - counts).argmax())] += 1
    return counts


def estimated_softmax(
    weight_gradient: torch.Tensor,
    bias_gradient: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    absent: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch's mean softmax as the attacker estimates it, ``(classes,)``.

    The softmax at the probability-weighted mean feature of the classes with a
    positive bias gradient (see the module notes).  Falls back to the bias
    alone (features of zero) when no class has a positive gradient mass.
    """
    if absent is None:
        absent = bias_gradient > 0
    mass = bias_gradient[absent].sum()
    if float(mass) <= 0:
        return torch.softmax(bias, dim=-1)
    feature = weight_gradient[absent].sum(dim=0) / mass
    return torch.softmax(weight @ feature + bias, dim=-1)


def batch_labels(observation: Observation, *, fit_logits: bool = False) -> torch.Tensor:
    """The batch's labels as a sorted multiset, ``(batch_size,)`` on the observation's device.

    Which example has which label cannot be told from a mean gradient; the
    order is ascending.  For one example this is iDLG's label.  `fit_logits`
    checks the rule's answer against every candidate multiset by fitting the
    examples' logits (`fitted_label_counts`: for trained, confident models;
    seconds at B = 8).

    Raises:
        AttackNotApplicable: No final Linear layer with a bias, or a label
            space that does not match it.
    """
    model = observation.model
    weight_name, bias_name, weight_gradient = _class_layer(
        observation,
        observation.parameter_names,
        "the batch label rule",
        "the batch label rule reads the last Linear layer's bias gradient and this "
        "model's has no bias; use --method dlg, which learns the labels",
    )
    counts = batch_label_counts_from_gradients(
        weight_gradient,
        observation.gradient(bias_name),
        model.get_parameter(weight_name).detach(),
        model.get_parameter(bias_name).detach(),
        observation.batch_size,
    )
    if fit_logits:
        counts = fitted_label_counts(
            weight_gradient,
            observation.gradient(bias_name),
            model.get_parameter(weight_name).detach(),
            model.get_parameter(bias_name).detach(),
            observation.batch_size,
            counts,
        )
    classes = torch.arange(len(counts), device=counts.device)
    return torch.repeat_interleave(classes, counts).to(observation.device)


# --- FedAvg updates ----------------------------------------------------------
#
# A client that takes K steps returns  update = -lr * sum_t d_t,  where d_t is
# what its optimiser steps along.  For SGD with momentum mu (dampening 0),
# d_t = b_t = mu b_{t-1} + g_t, so  sum_t d_t = sum_j w_j g_j  with
# w_j = (1 - mu^(K-j)) / (1 - mu): the gradient of step j counts once for
# every later step, decayed.  Nesterov steps along g_t + mu b_t, so
# w_j = 1 + mu (1 - mu^(K-j)) / (1 - mu).  Weight decay adds wd * p_j to each
# g_j.  If every step's mini-batch gradient is alike on average (the examples
# are seen equally often, the weights move little), then
# -update / (lr * sum_j w_j) - wd * p_mean  is the mean FedSGD gradient over
# the client's n examples, and the batch rule above reads its label counts.
# Adam's step is no linear function of the gradients: its update has the sign
# of each weight's running mean gradient and a size that says little of the
# gradient's.  The signs still tell which classes the client holds (a present
# class is under-predicted, its bias moves up); the counts are then only
# shared out in proportion to how far each present class's bias moved.


def step_weights(optimizer: ClientOptimizer, steps: int) -> list[float]:
    """How much the gradient of each step counts in an SGD client's update (see above)."""
    mu = optimizer.momentum
    if mu == 0:
        return [1.0] * steps
    decayed = [(1 - mu ** (steps - j)) / (1 - mu) for j in range(steps)]
    if optimizer.nesterov:
        return [1 + mu * w for w in decayed]
    return decayed


def update_as_gradient(observation: UpdateObservation) -> Observation:
    """A FedAvg update read as the mean FedSGD gradient over the client's n examples.

    ``-update / (lr * sum_j w_j)``, less the weight decay's share at the
    round's mean weights; for Adam ``-update / (lr * K)``, whose signs only are
    meaningful.
    """
    optimizer = observation.optimizer
    steps = observation.steps
    scale = observation.local_lr * (
        sum(step_weights(optimizer, steps)) if optimizer.kind == "sgd" else steps
    )
    share = (steps - 1) / (2 * steps)
    gradients = []
    for name, update in zip(observation.parameter_names, observation.update, strict=True):
        gradient = -update / scale
        if optimizer.kind == "sgd" and optimizer.weight_decay:
            mean = observation.sent[name].to(update) + share * update
            gradient = gradient - optimizer.weight_decay * mean
        gradients.append(gradient)
    return Observation(
        model=observation.model,
        gradients=tuple(gradients),
        parameter_names=observation.parameter_names,
        input_shape=observation.input_shape,
        num_classes=observation.num_classes,
        batch_size=observation.num_examples,
    )


def update_label_counts(
    observation: UpdateObservation, *, fit_logits: bool = False
) -> torch.Tensor:
    """How many examples of each class a FedAvg client trained on, from its update alone.

    One step on the whole batch is FedSGD: `batch_labels`' rule, exact where it
    is.  Otherwise the update read as a mean gradient (`update_as_gradient`),
    with the last layer evaluated at ``sent + (K - 1) / (2K) * update``, the
    mean of the weights at which the K steps took their gradients if the
    weights move evenly.  An estimate: see `inverting.py`'s module notes for
    what it assumes and how often it is exact.  `fit_logits` (plain SGD only)
    checks the answer by fitting the examples' logits at those mean weights
    (`fitted_label_counts`; the identity it fits then holds only as far as
    the weights stand still over the round).

    Returns:
        Integer counts, ``(classes,)``, summing to the client's example count.

    Raises:
        AttackNotApplicable: No last Linear layer with a trainable bias, or one
            whose outputs are not the classes.
    """
    pseudo = update_as_gradient(observation)
    n = observation.num_examples
    weight_name, bias_name, weight_gradient = _class_layer(
        pseudo,
        observation.parameter_names,
        "the label-count rule",
        "the label-count rule reads the update of the last Linear layer's bias and this "
        "model's has none (or it is frozen); the labels cannot be read",
    )
    bias_gradient = pseudo.gradient(bias_name).double()
    if observation.optimizer.kind != "sgd":
        present = bias_gradient < 0
        if int(present.sum()) > n:  # keep the n most clearly present classes
            keep = torch.topk(-bias_gradient, n).indices
            present = torch.zeros_like(present).index_fill_(0, keep, True)
        mass = (-bias_gradient).clamp_min(0)
        estimate = n * mass / mass.sum().clamp_min(1e-300)
        return _round_counts(estimate, present, n)
    share = (observation.steps - 1) / (2 * observation.steps)
    weight, bias = (
        observation.sent[name].to(weight_gradient) + share * observation.parameter_update(name)
        for name in (weight_name, bias_name)
    )
    if int((bias_gradient < 0).sum()) > n:
        # More classes look present than there are examples: the estimate has drifted (many
        # steps, a large lr); keep the n most negative, as the counts must sum to n.
        order = torch.argsort(bias_gradient)
        bias_gradient = bias_gradient.clone()
        bias_gradient[order[n:]] = bias_gradient[order[n:]].clamp_min(1e-30)
    counts = batch_label_counts_from_gradients(weight_gradient, bias_gradient, weight, bias, n)
    if fit_logits:
        counts = fitted_label_counts(weight_gradient, bias_gradient, weight, bias, n, counts)
    return counts


def _class_layer(
    observation: Observation, trainable: tuple[str, ...], rule: str, no_bias: str
) -> tuple[str, str, torch.Tensor]:
    """The last Linear layer's weight and bias names and its weight gradient, checked.

    Raises:
        AttackNotApplicable: No trainable bias (`no_bias` says so), or outputs that are
            not the classes.
    """
    weight_name, bias_name = last_linear_layer(observation.model)
    if bias_name is None or bias_name not in trainable:
        raise AttackNotApplicable(no_bias)
    weight_gradient = observation.gradient(weight_name)
    if weight_gradient.shape[0] != observation.num_classes:
        raise AttackNotApplicable(
            f"the last Linear layer has {weight_gradient.shape[0]} outputs, not the "
            f"{observation.num_classes} classes; {rule} does not apply"
        )
    return weight_name, bias_name, weight_gradient
