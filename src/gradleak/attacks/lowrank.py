"""A linear layer's part of the matching objective, from its outer-product structure.

For a batch of B examples a linear layer's weight gradient is ``E H^T``: the
errors at its output ``E`` (outputs x B) times its inputs ``H`` (features x
B), of rank at most B.  Its part of the matching loss, ``|E H^T - G|^2``, and
the two products the derivatives need, ``R H`` and ``R^T E`` with ``R = E H^T
- G``, come from B-column products: no outputs-by-features matrix is formed
for the dummy.  On LFW's 5,749-class layer that matrix was the largest tensor
of an evaluation, written and read several times per call.

The shared gradient G enters in one of two ways, per victim:

- **its own factors**, ``G = e0 h0^T``, where it is exactly of rank one in its
  own precision (one example, and no defense that breaks the rank: noise and
  pruning do, DP clipping only scales it).  With ``de = e - e0`` and ``dh = h -
  h0``, ``R = de h^T + e0 dh^T``, whose square and products are written with
  small differences, so nothing cancels when the dummy is at the answer;
- **products with it** otherwise: ``N h`` and ``N^T e`` (N = G).  The square is
  then ``|E H^T|^2 - 2 <E, N H> + |N|^2``, which at the answer cancels about
  as many digits as float32 has, so these terms run in float64.

All the small algebra (dot products of vectors) runs in float64 whatever the
attack's precision: it costs nothing next to the products, and the faithful
float32 objective then rounds no worse than the plain one.  Weights enter
through ``W x`` and ``W^T y`` only.  Small layers are stacked across victims
(batched products); large ones (LFW's) stay the observations' own tensors,
multiplied one victim at a time, so the engine copies none of them, and are
converted to the compute precision in blocks of rows that stay in cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# A layer of at least this many entries stays per victim instead of being
# stacked: LFW's last layer has 4.4M (17.6 MB per victim in float32), CIFAR-100's 77k.
LARGE = 1 << 20
# Rows converted at a time when a per-victim matrix is in another precision
# than the products (256 x 768 float64: 1.5 MB).
BLOCK_ROWS = 256


# Converted copies of per-victim matrices kept at most, in bytes, and the
# products a victim's matrix takes part in before it gets one.  Improved mode
# multiplies LFW's float32 layer in float64: most victims finish after one
# evaluation (4 products), for which converting block by block costs less
# than a fresh 35 MB copy; the few that run on keep a copy instead of
# converting again at every evaluation.
CONVERTED_BUDGET = 512 * 2**20
CONVERT_AFTER = 8


class Matrices:
    """One ``(O, F)`` matrix per victim, used only through products with a few columns.

    Args:
        matrices: The victims' matrices (any floating dtype); large ones are
            kept as given, small ones stacked and converted to `dtype` once.
        dtype: The precision of the products.
    """

    def __init__(self, matrices: Sequence[torch.Tensor], dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.shape = tuple(matrices[0].shape)
        self._list: list[torch.Tensor] | None = None
        self._stacked: torch.Tensor | None = None
        self._ids = list(range(len(matrices)))  # each row's victim, for the cache
        self._converted: dict[int, torch.Tensor] = {}  # shared by every selection
        self._uses: dict[int, int] = {}
        if matrices[0].numel() >= LARGE:
            self._list = [m.detach() for m in matrices]
        else:
            self._stacked = torch.stack([m.detach().to(dtype) for m in matrices])

    def __len__(self) -> int:
        return len(self._ids)

    def select(self, rows: torch.Tensor) -> Matrices:
        """The matrices of `rows` (indices), sharing storage where they are kept per victim.

        Converted copies of victims not selected are dropped (victims only leave).
        """
        out = Matrices.__new__(Matrices)
        out.dtype, out.shape = self.dtype, self.shape
        picked = rows.tolist()
        out._ids = [self._ids[r] for r in picked]
        out._converted, out._uses = self._converted, self._uses
        for gone in set(self._converted) - set(out._ids):
            del self._converted[gone]
        out._list = [self._list[r] for r in picked] if self._list is not None else None
        out._stacked = self._stacked[rows] if self._stacked is not None else None
        return out

    def times(self, x: torch.Tensor) -> torch.Tensor:
        """``M x`` per victim: ``x (V, F, B)`` -> ``(V, O, B)``."""
        if self._stacked is not None:
            return _product(self._stacked, x)
        return self._per_matrix(x, _times)

    def transposed_times(self, y: torch.Tensor) -> torch.Tensor:
        """``M^T y`` per victim: ``y (V, O, B)`` -> ``(V, F, B)``."""
        if self._stacked is not None:
            return _product(self._stacked.transpose(1, 2), y)
        return self._per_matrix(y, transposed_times)

    def _per_matrix(self, x: torch.Tensor, product: Callable) -> torch.Tensor:
        """`product` of each distinct matrix with the columns of every row that holds it.

        Rows that hold the same tensor (two attacks on one victim) share one
        pass over it: a large layer's products are bound by memory, so two
        columns cost about what one does.
        """
        assert self._list is not None
        rows: dict[tuple, list[int]] = {}
        for k, m in enumerate(self._list):  # the same storage, viewed the same way
            rows.setdefault((m.data_ptr(), m.dtype, m.shape, m.stride()), []).append(k)
        out: list[torch.Tensor | None] = [None] * len(x)
        batch = x.shape[2]
        for group in rows.values():
            columns = x[group].permute(1, 0, 2).reshape(x.shape[1], -1)
            result = product(self._matrix(group[0]), columns)
            for j, k in enumerate(group):
                out[k] = result[:, j * batch : (j + 1) * batch]
        return torch.stack(out)  # type: ignore[arg-type]

    def _matrix(self, row: int) -> torch.Tensor:
        """Row `row`'s matrix: as given, or its converted copy where the budget allows."""
        assert self._list is not None
        m = self._list[row]
        if m.dtype == self.dtype:
            return m
        victim = self._ids[row]
        if victim not in self._converted:
            self._uses[victim] = uses = self._uses.get(victim, 0) + 1
            if uses < CONVERT_AFTER:
                return m
            size = m.numel() * self.dtype.itemsize
            held = sum(c.numel() * c.element_size() for c in self._converted.values())
            if held + size > CONVERTED_BUDGET:
                return m  # converted block by block in the product
            self._converted[victim] = m.to(self.dtype)
        return self._converted[victim]


# A product with at most this many columns on the right is a batch of
# matrix-times-vector products (a linear layer: one column per example).
FEW_COLUMNS = 4


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a (V, M, K) @ b (V, K, N)`` in the form the CPU runs fastest.

    bench/products.py times both forms.  With 16 victims of a 100 x 768 layer
    on the 2-core CPU: ``W @ x`` for one column x took 1.7 ms as a batched
    matrix product and 0.56 ms as ``(x^T W^T)^T``; ``W^T @ e`` 2.3 ms against
    0.19 ms as ``(e^T W)^T``.
    """
    if b.shape[2] <= FEW_COLUMNS:
        return torch.bmm(b.transpose(1, 2), a.transpose(1, 2)).transpose(1, 2)
    return torch.bmm(a, b)


def _times(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if m.dtype == x.dtype:
        return m @ x
    return torch.cat(
        [m[i : i + BLOCK_ROWS].to(x.dtype) @ x for i in range(0, m.shape[0], BLOCK_ROWS)]
    )


def transposed_times(m: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``m^T y`` in y's precision, converting `m` a block of rows at a time if it differs."""
    if m.dtype == y.dtype:
        return (y.T @ m).T
    out = y.new_zeros(y.shape[1], m.shape[1])
    for i in range(0, m.shape[0], BLOCK_ROWS):
        out += y[i : i + BLOCK_ROWS].T @ m[i : i + BLOCK_ROWS].to(y.dtype)
    return out.T


def rank_one_factors(gradient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(e0, h0)`` in float64 with ``gradient = e0 h0^T`` in its own precision, or None.

    ``e0`` is the column through the largest entry (its values exactly) and
    ``h0`` that entry's row divided by it.  The gradient counts as rank one
    when every entry is within 8 units of its precision's epsilon of ``e0_i
    h0_j``: a client's ``fl(e_i h_j)`` is within about 3 (one rounding for the
    product, two for the pivot's and the division's), a clipped one about 4;
    noise, pruning or lower precision put entries far outside.
    """
    if gradient.dim() != 2 or not gradient.dtype.is_floating_point:
        return None
    g = gradient.detach()
    pivot = int(g.abs().argmax())
    row, col = divmod(pivot, g.shape[1])
    scale = float(g[row, col])
    if scale == 0.0 or not bool(torch.isfinite(g[row]).all()):
        return None
    e0 = g[:, col].to(torch.float64)
    h0 = g[row].to(torch.float64) / scale
    info = torch.finfo(g.dtype)
    for i in range(0, g.shape[0], BLOCK_ROWS):  # in blocks: no full float64 copy
        approx = e0[i : i + BLOCK_ROWS, None] * h0[None, :]
        error = (g[i : i + BLOCK_ROWS].to(torch.float64) - approx).abs()
        if not bool((error <= 8 * info.eps * approx.abs() + 4 * info.tiny).all()):
            return None
    return e0, h0


class SharedGradient:
    """One linear layer's shared weight gradients: factors where exact, else the matrices.

    Args:
        gradients: The victims' shared weight gradients ``(O, F)``.
        batch_size: Examples per victim; factors are only sought for one.
    """

    def __init__(self, gradients: Sequence[torch.Tensor], batch_size: int) -> None:
        victims, (outputs, features) = len(gradients), tuple(gradients[0].shape)
        self.e0 = torch.zeros(victims, outputs, dtype=torch.float64, device=gradients[0].device)
        self.h0 = torch.zeros(victims, features, dtype=torch.float64, device=gradients[0].device)
        dense = []
        found: dict[tuple, tuple[torch.Tensor, torch.Tensor] | None] = {}
        for v, g in enumerate(gradients):
            # Rows of two attacks on one victim hold the same gradient: factor it once.
            key = (g.data_ptr(), g.dtype, g.shape, g.stride())
            if key not in found:
                found[key] = rank_one_factors(g) if batch_size == 1 else None
            factors = found[key]
            if factors is None:
                dense.append(v)
            else:
                self.e0[v], self.h0[v] = factors
        self.dense_rows = torch.tensor(dense, dtype=torch.long, device=self.e0.device)
        self.dense = Matrices([gradients[v] for v in dense], torch.float64) if dense else None
        self.dense_squared = torch.stack(
            [gradients[v].to(torch.float64).pow(2).sum() for v in dense]
        ) if dense else self.e0.new_zeros(0)  # fmt: skip
        self.batch_size = batch_size

    def select(self, rows: torch.Tensor) -> SharedGradient:
        """The victims `rows` (indices) only."""
        out = SharedGradient.__new__(SharedGradient)
        out.batch_size = self.batch_size
        out.e0, out.h0 = self.e0[rows], self.h0[rows]
        if self.dense is None:
            out.dense, out.dense_rows, out.dense_squared = None, self.dense_rows, self.dense_squared
            return out
        # Where each selected victim sits among the dense ones (-1: factored).
        position = torch.full((len(self.e0),), -1, dtype=torch.long, device=rows.device)
        position[self.dense_rows] = torch.arange(len(self.dense_rows), device=rows.device)
        picked = position[rows]
        keep = picked >= 0
        out.dense_rows = keep.nonzero().flatten()
        out.dense = self.dense.select(picked[keep]) if bool(keep.any()) else None
        out.dense_squared = self.dense_squared[picked[keep]]
        return out

    def terms(
        self, e: torch.Tensor, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``|E H^T - G|^2`` (float64), ``R H`` and ``R^T E`` (in E's dtype) per victim.

        Args:
            e: The errors at the layer's output, ``(V, O, B)``.
            h: The layer's inputs, ``(V, F, B)``.
        """
        dtype = e.dtype
        e64, h64 = e.to(torch.float64), h.to(torch.float64)
        if self.batch_size == 1:
            loss, rh, rte = _factored(e64[..., 0], h64[..., 0], self.e0, self.h0)
            rh, rte = rh[..., None], rte[..., None]
        else:  # no factors: R = E H^T - N, the first part from B x B Gram matrices
            ete, hth = e64.transpose(1, 2) @ e64, h64.transpose(1, 2) @ h64
            loss = (ete * hth).sum((1, 2))
            rh, rte = e64 @ hth, h64 @ ete
        if self.dense is not None:
            d = self.dense_rows
            nh = self.dense.times(h64[d])
            nte = self.dense.transposed_times(e64[d])
            loss = loss.index_add(0, d, self.dense_squared - 2 * (e64[d] * nh).sum((1, 2)))
            rh = rh.index_add(0, d, -nh)
            rte = rte.index_add(0, d, -nte)
        return loss, rh.to(dtype), rte.to(dtype)


def _factored(
    e: torch.Tensor, h: torch.Tensor, e0: torch.Tensor, h0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One example: ``R = e h^T - e0 h0^T = de h^T + e0 dh^T``; its square, ``R h``, ``R^T e``.

    Victims without factors have ``e0 = h0 = 0``: then R is ``e h^T``, and the
    caller subtracts the shared gradient's part.
    """
    de, dh = e - e0, h - h0

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).sum(1, keepdim=True)

    hh, dh_h, de_e, e0_e = dot(h, h), dot(dh, h), dot(de, e), dot(e0, e)
    loss = dot(de, de) * hh + 2 * dot(de, e0) * dot(h, dh) + dot(e0, e0) * dot(dh, dh)
    return loss[:, 0], de * hh + e0 * dh_h, h * de_e + dh * e0_e
