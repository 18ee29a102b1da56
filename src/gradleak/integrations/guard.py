"""The client's side: inspect the weights a server sends before training on them.

A dishonest server that crafts weights (`attacks/imprint.py`, Robbing the Fed,
trap weights) leaves signatures that honest training does not: many rows of a
layer equal to each other (one statistic measured m times), a weight matrix of
rank far below its size, a bias vector laid out in order (bins at quantiles),
columns of the next layer all alike (the error equaliser), convolution kernels
that copy one input pixel or are all zero (pass-through), and a jump from the
previous round's weights far larger than learning makes.  Light checks of
this kind are what the literature found to catch the imprint and trap families
(PAPERS.md: Carletti et al.; SEER was designed to evade them).

`inspect_weights` runs them on a state dict (NumPy or torch tensors) and
returns the reasons to refuse, empty when nothing looks crafted.  It costs a
few vector operations per tensor: no decomposition of a large matrix, and the checks
of structure look at fixed samples (rows' directions on 64 sampled columns, at most
1,024 sampled kernels, the rank of a random projection of at most 64 columns of 256
sampled rows, the jump on 16 runs of 2,048 entries a tensor); only the NaN check reads
every weight, as one sum a tensor.
`flower.ModelGuard` calls it in a Flower client mod.

What it does not catch: weights crafted to look like training (SEER's
learned decoder), and attacks that change the architecture (the client code
fixes it in Flower, so those are out of reach there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["GuardSettings", "inspect_weights"]


@dataclass(frozen=True)
class GuardSettings:
    """Thresholds of the checks (measured on honest runs: README, "A dishonest server").

    Attributes:
        duplicate_share: Refuse a layer whose share of rows (or columns) equal to
            another row (column) is above this.
        aligned_cosine, aligned_rows, aligned_share: Refuse a matrix with at least
            `aligned_rows` rows (and `aligned_share` of them) whose direction another
            row shares to this cosine (trap rows: exact repeats, or with noise added,
            or a few bins among honest rows).
        dominant_share: Refuse a matrix whose top singular direction holds more
            than this share of its squared norm (its rows nearly alike, e.g. trap
            rows with noise added to hide the repeats).
        rank_share: Refuse a matrix whose sampled rank is below this share of
            what its shape allows.
        ordered_bias: Refuse a bias of at least `min_units` entries whose rank
            correlation with its position is above this (bins in order).
        sparse_share, sparse_outputs: Refuse a convolution with at least
            `sparse_outputs` output channels whose weights are at most `sparse_share`
            non-zero (on a sample of about 64 each).
        copy_kernels: Refuse a convolution whose share of kernels with a single
            non-zero entry, or of all-zero kernels, is above this.
        jump: Refuse weights that moved from the previous round's by more than
            this multiple of the previous weights' norm.
        min_units: Checks apply to layers with at least this many rows.
    """

    duplicate_share: float = 0.5
    aligned_cosine: float = 0.99
    aligned_rows: int = 8
    aligned_share: float = 0.01
    dominant_share: float = 0.5
    rank_share: float = 0.25
    ordered_bias: float = 0.95
    copy_kernels: float = 0.5
    sparse_share: float = 0.15
    sparse_outputs: int = 1
    jump: float = 2.0
    min_units: int = 16


def inspect_weights(
    state: Mapping[str, Any],
    previous: Mapping[str, Any] | None = None,
    settings: GuardSettings | None = None,
) -> list[str]:
    """The reasons to refuse these weights (empty: nothing looks crafted).

    Args:
        state: ``name -> array`` of the weights received.
        previous: The weights received the round before, or None.
        settings: The thresholds.
    """
    settings = settings or GuardSettings()
    reasons: list[str] = []
    # Kept in their own precision (a float64 copy of a ResNet-18 costs more than every check);
    # the small matrices and vectors are widened where they are checked.
    arrays = {name: np.asarray(_numpy(value)) for name, value in state.items()}
    for name, w in arrays.items():
        if not np.issubdtype(w.dtype, np.floating):
            continue  # counters (BatchNorm's num_batches_tracked)
        # One pass over every weight: a NaN or an infinity anywhere makes the sum non-finite.
        # NumPy's own reduction, not BLAS: a multithreaded BLAS call on a busy client costs
        # more in waking threads than the sum itself.
        if not np.isfinite(np.add.reduce(w.reshape(-1))):
            reasons.append(f"{name} has NaN or infinite values")
            continue
        if w.ndim == 2 and min(w.shape) >= 2:
            reasons += _matrix(name, w.astype(np.float64), settings)
        elif w.ndim == 4 and w.shape[0] >= settings.min_units // 4:
            reasons += _kernels(name, w, settings)
        elif w.ndim == 1 and name.endswith("bias") and len(w) >= settings.min_units:
            reasons += _bias(name, w.astype(np.float64), settings)
    if previous is not None:
        reasons += _jumps(arrays, previous, settings)
    return reasons


def _numpy(value: Any) -> Any:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else value


def _duplicated_share(rows: np.ndarray) -> float:
    """The share of rows equal (to about 6 significant digits) to some other row.

    Rows are compared by their projection on one random direction (one matrix-vector
    product, no sort of the matrix): equal rows project to the same value, and honest rows
    almost never come within 1e-6 of the spread of the projections of each other (a few
    chance pairs in a thousand rows, against a threshold of half the rows).
    """
    direction = np.random.default_rng(0).standard_normal(rows.shape[1])
    projected = np.sort(np.einsum("ij,j->i", rows, direction))  # einsum: no BLAS threads
    tolerance = 1e-6 * (np.abs(projected).max() or 1.0)
    close = np.diff(projected) <= tolerance
    linked = np.zeros(len(projected), dtype=bool)
    linked[:-1] |= close
    linked[1:] |= close
    return float(linked.mean())


def _matrix(name: str, w: np.ndarray, settings: GuardSettings) -> list[str]:
    reasons = []
    if w.shape[0] >= settings.min_units:
        share = _duplicated_share(w)
        aligned = _aligned_rows(w, settings.aligned_cosine)
        if share > settings.duplicate_share and np.abs(w).max() > 0:
            reasons.append(f"{name}: {share:.0%} of its rows repeat another row")
        elif aligned >= max(settings.aligned_rows, settings.aligned_share * len(w)):
            reasons.append(
                f"{name}: {aligned} of its rows point the same way as another row "
                f"(cosine above {settings.aligned_cosine})"
            )
    if w.shape[1] >= settings.min_units:
        share = _duplicated_share(w.T)
        if share > settings.duplicate_share and np.abs(w).max() > 0:
            reasons.append(f"{name}: {share:.0%} of its columns repeat another column")
    if min(w.shape) >= settings.min_units and not reasons:
        share = _dominant_share(w)
        if share > settings.dominant_share:
            reasons.append(
                f"{name}: one direction holds {share:.0%} of its energy (rows nearly alike)"
            )
    if min(w.shape) >= settings.min_units and not reasons:
        rng = np.random.default_rng(0)
        rows = w[rng.choice(w.shape[0], min(256, w.shape[0]), replace=False)]
        width = min(64, w.shape[1], len(rows))
        projected = rows @ rng.standard_normal((w.shape[1], width))
        rank = int(np.linalg.matrix_rank(projected, tol=1e-6 * (np.abs(projected).max() or 1)))
        if rank < settings.rank_share * width:
            reasons.append(f"{name}: rank {rank} where its shape allows {width} (sampled)")
    return reasons


def _aligned_rows(
    w: np.ndarray, cosine: float, queries: int = 1024, rows_kept: int = 4096, columns: int = 64
) -> int:
    """How many non-zero rows (of up to `queries` sampled, scaled to the whole matrix) have
    another row (of up to `rows_kept`) at a cosine above `cosine`, on up to `columns` sampled
    columns.  Random or trained rows of a layer point in their own directions (on 64
    columns their cosines spread about 1/sqrt(64), far below 0.99); rows that measure one
    statistic of the input point in the same one, noise or not, on any columns."""
    rng = np.random.default_rng(0)
    if w.shape[1] > columns:
        w = w[:, np.sort(rng.choice(w.shape[1], columns, replace=False))]
    if len(w) > rows_kept:
        w = w[np.sort(rng.choice(len(w), rows_kept, replace=False))]
    norms = np.linalg.norm(w, axis=1)
    keep = norms > 0
    rows = (w[keep] / norms[keep, None]).astype(np.float32)  # cosines to 1e-6 are plenty
    if len(rows) < 2:
        return 0
    asked = np.arange(len(rows))
    if len(rows) > queries:
        asked = np.sort(rng.choice(len(rows), queries, replace=False))
    gram = rows[asked] @ rows.T
    gram[np.arange(len(asked)), asked] = 0.0
    count = int((gram.max(axis=1) > cosine).sum())
    return round(count * len(w) / len(asked))


def _dominant_share(w: np.ndarray, steps: int = 20, sample: int = 256) -> float:
    """The share of ``|W|_F^2`` in W's top singular direction (power iteration), on up to
    `sample` sampled rows and columns: rows nearly alike stay nearly alike on any of them."""
    rng = np.random.default_rng(0)
    if w.shape[0] > sample:
        w = w[np.sort(rng.choice(w.shape[0], sample, replace=False))]
    if w.shape[1] > sample:
        w = w[:, np.sort(rng.choice(w.shape[1], sample, replace=False))]
    total = float((w * w).sum())
    if total == 0:
        return 0.0
    v = np.random.default_rng(0).standard_normal(w.shape[1])
    for _ in range(steps):
        v = w.T @ (w @ v)
        v /= np.linalg.norm(v) or 1.0
    return float(np.linalg.norm(w @ v) ** 2 / total)


def _kernels(name: str, w: np.ndarray, settings: GuardSettings, sample: int = 1024) -> list[str]:
    kernels = w.reshape(w.shape[0] * w.shape[1], -1)
    if kernels.shape[1] < 2:
        return []  # 1 x 1 convolutions are matrices of channels; leave them
    if len(kernels) > sample:  # shares: evenly spaced kernels estimate them to a few %
        kernels = kernels[:: len(kernels) // sample]
    nonzero = (np.abs(kernels) > 1e-12).sum(axis=1)
    single, empty = float((nonzero == 1).mean()), float((nonzero == 0).mean())
    reasons = []
    if single > settings.copy_kernels:
        reasons.append(f"{name}: {single:.0%} of its kernels copy a single input pixel")
    if empty > settings.copy_kernels:
        reasons.append(f"{name}: {empty:.0%} of its kernels are all zero")
    # Every output channel, on about 64 evenly spaced weights each: a channel that copies
    # or averages one input channel is zero almost everywhere, even when the server fills
    # the channels it does not use with noise to hide the zero kernels above.
    per = w.reshape(w.shape[0], -1)
    per = per[:, :: max(1, per.shape[1] // 64)]
    live = np.count_nonzero(per, axis=1) / per.shape[1]
    sparse = int((live <= settings.sparse_share).sum())
    if sparse >= settings.sparse_outputs and not reasons:
        reasons.append(
            f"{name}: {sparse} of its output channels read almost nothing "
            f"(at most {settings.sparse_share:.0%} of their weights non-zero: copies of one input)"
        )
    return reasons


def _bias(name: str, b: np.ndarray, settings: GuardSettings) -> list[str]:
    if np.ptp(b) == 0:
        return []
    ranks = np.argsort(np.argsort(b, kind="stable"), kind="stable").astype(np.float64)
    position = np.arange(len(b), dtype=np.float64)
    correlation = abs(float(np.corrcoef(ranks, position)[0, 1]))
    if correlation > settings.ordered_bias:
        return [f"{name}: its entries are in order (rank correlation {correlation:.2f}), as bins"]
    return []


def _runs(flat: np.ndarray, runs: int = 16, length: int = 2048) -> np.ndarray:
    """`runs` evenly spaced stretches of `length` entries (all of it when that is smaller)."""
    if flat.size <= runs * length:
        return flat.astype(np.float64)
    starts = np.linspace(0, flat.size - length, runs).astype(int)
    return np.concatenate([flat[s : s + length] for s in starts]).astype(np.float64)


def _jumps(
    arrays: Mapping[str, np.ndarray], previous: Mapping[str, Any], settings: GuardSettings
) -> list[str]:
    reasons = []
    for name, w in arrays.items():
        if name not in previous:
            continue
        before = np.asarray(_numpy(previous[name]))
        if not np.issubdtype(w.dtype, np.floating) or w.ndim < 2:
            continue  # biases and BatchNorm's vectors start near zero: any step is a jump
        if before.shape != w.shape:
            reasons.append(f"{name} changed shape since the last round")
            continue
        # On a fixed sample: 16 evenly spaced runs of 2,048 entries (whole rows and kernels,
        # which is what crafted weights change; contiguous, so cheap to read).
        a, b = _runs(w.reshape(-1)), _runs(before.reshape(-1))
        square = float(np.einsum("i,i", b, b))  # einsum: no BLAS threads (see above)
        change = (float(np.einsum("i,i", a - b, a - b)) / square) ** 0.5 if square > 0 else 0.0
        if change > settings.jump:
            reasons.append(f"{name} moved {change:.1f}x its own norm since the last round")
    return reasons
