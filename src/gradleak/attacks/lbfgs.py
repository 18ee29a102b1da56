"""L-BFGS for many independent problems at once, each with its own state.

`FaithfulLBFGS` is ``torch.optim.LBFGS`` without line search (the papers'
optimiser), re-expressed as a state machine that advances every problem by
one function evaluation per call: each problem keeps its own memory, step
size, inner-iteration count and break conditions, exactly as the sequential
optimiser would, so a batch follows the same trajectories as one-by-one runs
(up to floating-point summation order).

`RobustLBFGS` is gradleak's improved optimiser: the same two-loop direction
with an Armijo backtracking line search, so no step can increase the loss.

State lives in one dict of tensors whose first dimension is the problem; the
engine reuses a finished problem's row for a waiting one (`replace`) and,
once none wait, removes finished rows by indexing every entry (`keep`).
"""

from __future__ import annotations

import torch

TOLERANCE_GRAD = 1e-7
TOLERANCE_CHANGE = 1e-9
CURVATURE_EPS = 1e-10


class _Memory:
    """Per-problem ring buffers of L-BFGS curvature pairs.

    The direction uses the compact representation of the L-BFGS matrix
    (Byrd, Nocedal, Schnabel 1994) instead of the two-loop recursion: in exact
    arithmetic both give the same ``H g``, but the compact form is a handful
    of batched matrix products, where the two-loop is 2 x history dependent
    steps, each a separate small op for every problem.  The inner products
    ``s_i . y_j`` and ``y_i . y_j`` are kept up to date as pairs arrive.
    """

    def __init__(self, n: int, size: int, history: int, like: torch.Tensor) -> None:
        self.history = history
        # One buffer for both kinds of pair vector, so that every product with
        # them is one batched matrix product: rows [0, m) hold s, [m, 2m) y.
        self.vectors = like.new_zeros(n, 2 * history, size)
        # products_matrix[:, 0, i, j] = s_i . y_j, [:, 1, i, j] = y_i . y_j (slots).
        self.products_matrix = like.new_zeros(n, 2, history, history)
        self.count = torch.zeros(n, dtype=torch.long, device=like.device)
        self.head = torch.zeros(n, dtype=torch.long, device=like.device)

    _rows = ("vectors", "products_matrix", "count", "head")

    def keep(self, rows: torch.Tensor) -> None:
        _keep_rows(self, rows, self._rows)

    def reset(self, mask: torch.Tensor) -> None:
        """Forget the pairs of the problems in `mask`.

        Their stored vectors are zeroed too: a product with a forgotten slot
        is masked by multiplying with zero, which a NaN left there by a
        diverged run would survive.
        """
        rows = mask.nonzero().flatten()
        if rows.numel() == 0:
            return
        self.count[rows] = 0
        self.head[rows] = 0
        self.vectors[rows] = 0
        self.products_matrix[rows] = 0

    def used(self) -> int:
        """Slots in use by any problem: until a problem's buffer wraps around, its
        pairs sit in slots 0 .. count - 1, so the rest of every buffer is zero."""
        return int(self.count.max()) if len(self.count) else 0

    def products(self, vectors: torch.Tensor) -> torch.Tensor:
        """``(n, k, D)`` vectors against every stored s and y: ``(n, k, 2m)``, one pass.

        Only the slots in use are read (a run that stops after a few pairs,
        as improved mode's mostly do, never reads its 100-pair buffer whole).
        """
        m, used = self.history, self.used()
        if used == m:
            return _dots(vectors, self.vectors)
        out = vectors.new_zeros(vectors.shape[0], vectors.shape[1], 2 * m)
        if used:
            out[:, :, :used] = _dots(vectors, self.vectors[:, :used])
            out[:, :, m : m + used] = _dots(vectors, self.vectors[:, m : m + used])
        return out

    def push(
        self,
        mask: torch.Tensor,
        s: torch.Tensor,
        y: torch.Tensor,
        before: torch.Tensor | None = None,
    ) -> None:
        """Store ``(s, y)`` for the problems in `mask`, dropping their oldest when full.

        Args:
            before: ``products(stack((s, y), 1))`` taken before this push, when
                the caller has it (it saves a pass over the buffer).
        """
        rows = mask.nonzero().flatten()
        if rows.numel() == 0:
            return
        m = self.history
        if before is None:
            before = self.products(torch.stack((s, y), dim=1))
        # (s; y) against every stored s and y, kept for `rows` only: s.S, s.Y,
        # y.S, y.Y.  The slot being overwritten gets the new pair's own products.
        slot = self.head[rows]
        dots = before[rows]  # (rows, 2, 2m)
        s_new, y_new = s[rows], y[rows]
        sy_new, yy_new = (s_new * y_new).sum(-1), (y_new * y_new).sum(-1)
        at = torch.arange(len(rows), device=rows.device)
        dots[at, 0, m + slot] = sy_new
        dots[at, 1, slot] = sy_new
        dots[at, 1, m + slot] = yy_new
        self.vectors[rows, slot] = s_new
        self.vectors[rows, m + slot] = y_new
        sy, yy = self.products_matrix[:, 0], self.products_matrix[:, 1]
        sy[rows, slot] = dots[:, 0, m:]  # s_new . y_j
        sy[rows, :, slot] = dots[:, 1, :m]  # s_i . y_new
        yy[rows, slot] = dots[:, 1, m:]
        yy[rows, :, slot] = dots[:, 1, m:]
        self.head[rows] = (slot + 1) % m
        self.count[rows] = torch.clamp(self.count[rows] + 1, max=m)

    def after_push(
        self,
        g_products: torch.Tensor,
        pushed: torch.Tensor,
        g: torch.Tensor,
        s: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        """``g . (s_j, y_j)`` taken before a push of ``(s, y)`` for the `pushed`
        problems, brought up to date: only the slots just written change."""
        rows = pushed.nonzero().flatten()
        if rows.numel() == 0:
            return g_products
        m = self.history
        slot = (self.head[rows] - 1) % m
        g_products = g_products.clone()
        g_products[rows, slot] = (g[rows] * s[rows]).sum(-1)
        g_products[rows, m + slot] = (g[rows] * y[rows]).sum(-1)
        return g_products

    def direction(
        self, g: torch.Tensor, h_diag: torch.Tensor, g_products: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``-H g`` per problem, H the L-BFGS inverse-Hessian approximation.

        Args:
            g_products: ``products(g[:, None])[:, 0]`` with the current buffer,
                when the caller has it.
        """
        n, m, k = g.shape[0], self.history, self.used()
        if k == 0:
            return -h_diag[:, None] * g
        # Logical positions 0 .. k - 1 only: no problem has more pairs.
        order = torch.arange(k, device=g.device)
        # Logical position j (0 = oldest) lives in slot (head - count + j) mod m.
        slots = (self.head - self.count)[:, None].add(order) % m
        valid = order[None, :] < self.count[:, None]
        pair = valid[:, :, None] & valid[:, None, :]
        # Both product matrices reordered to logical positions in one gather.
        flat = (slots[:, :, None] * m + slots[:, None, :]).reshape(n, 1, k * k)
        both = torch.gather(self.products_matrix.flatten(2), 2, flat.expand(n, 2, k * k))
        both = both.reshape(n, 2, k, k) * pair[:, None]
        sy, yy = both[:, 0], both[:, 1]
        if g_products is None:
            g_products = self.products(g.unsqueeze(1))[:, 0]
        uw = torch.gather(g_products, 1, torch.cat((slots, slots + m), 1))
        u, w = uw[:, :k] * valid, uw[:, k:] * valid  # g . s_j and g . y_j
        gamma = h_diag[:, None]
        # R: upper triangle of S^T Y; unused positions get a unit diagonal.
        r = torch.triu(sy) + torch.diag_embed((~valid).to(g.dtype))
        diag = torch.diagonal(sy, dim1=1, dim2=2)
        r_inv_u = torch.linalg.solve_triangular(r, u.unsqueeze(-1), upper=True)
        inner = diag.unsqueeze(-1) * r_inv_u + gamma.unsqueeze(-1) * torch.bmm(yy, r_inv_u)
        top = torch.linalg.solve_triangular(
            r.transpose(1, 2), inner - (gamma * w).unsqueeze(-1), upper=False
        ).squeeze(-1)
        bottom = -r_inv_u.squeeze(-1)
        # Back from logical positions to slots, then H g = gamma g + S top + gamma Y bottom.
        coefficients = torch.zeros(n, 2 * m, dtype=g.dtype, device=g.device).scatter_(
            1, torch.cat((slots, slots + m), 1), torch.cat((top * valid, gamma * bottom * valid), 1)
        )
        if k == m:
            combined = torch.bmm(coefficients.unsqueeze(1), self.vectors)
        else:  # the slots in use: 0 .. k - 1 of s and of y
            combined = torch.bmm(coefficients[:, None, :k], self.vectors[:, :k]) + torch.bmm(
                coefficients[:, None, m : m + k], self.vectors[:, m : m + k]
            )
        return -(gamma * g + combined.squeeze(1))


def _keep_rows(state: object, rows: torch.Tensor, names: tuple[str, ...]) -> None:
    """Keep only `rows` of each per-problem tensor attribute (finished problems leave)."""
    for name in names:
        setattr(state, name, getattr(state, name)[rows])


def _dots(vectors: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``vectors (n, k, D) . buffer (n, m, D)`` -> ``(n, k, m)``.

    Written as vector-times-transposed-matrix: on the CPU this runs about ten
    times faster than the equivalent matrix-times-vector bmm.
    """
    return torch.bmm(vectors, buffer.transpose(1, 2))


class FaithfulLBFGS:
    """``torch.optim.LBFGS(lr, history_size, max_iter)``, no line search, batched.

    Drive it with `advance(loss, grad)` after evaluating every problem at
    `z`; it returns which problems just finished an optimiser step (the point
    where a sequential caller would get ``step()``'s return value).
    """

    def __init__(self, z: torch.Tensor, *, lr: float, history: int, max_iter: int) -> None:
        n, size = z.shape
        self.lr, self.max_iter = lr, max_iter
        self.max_eval = max_iter * 5 // 4  # torch's default
        self.z = z.clone()
        self.memory = _Memory(n, size, history, z)
        self.d = torch.zeros_like(z)
        self.prev_g = torch.zeros_like(z)
        self.t = z.new_zeros(n)
        self.prev_loss = z.new_zeros(n)
        self.h_diag = z.new_ones(n)
        self.n_total = torch.zeros(n, dtype=torch.long, device=z.device)
        self.n_local = torch.zeros_like(self.n_total)
        # True: the next evaluation starts a step (step()'s first closure call).
        self.at_step_start = torch.ones(n, dtype=torch.bool, device=z.device)

    _rows = ("z", "d", "prev_g", "t", "prev_loss", "h_diag", "n_total", "n_local",
             "at_step_start")  # fmt: skip

    def keep(self, rows: torch.Tensor) -> None:
        _keep_rows(self, rows, self._rows)
        self.memory.keep(rows)

    def replace(self, rows: torch.Tensor, z: torch.Tensor) -> None:
        """New problems take over `rows` (whose problems finished), from `z`, fresh.

        Written in place: the other rows' memory is not copied, which removing
        finished rows and appending new ones would do every time.
        """
        fresh = FaithfulLBFGS(z, lr=self.lr, history=self.memory.history, max_iter=self.max_iter)
        for name in self._rows:
            getattr(self, name)[rows] = getattr(fresh, name)
        mask = torch.zeros_like(self.at_step_start)
        mask[rows] = True
        self.memory.reset(mask)

    def advance(self, loss: torch.Tensor, g: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Consume one evaluation at `z` for the `active` problems.

        Returns the mask of problems whose optimiser step ended here; their
        next evaluation starts a new step.
        """
        start = self.at_step_start & active
        inner = ~self.at_step_start & active
        opt_cond = g.abs().amax(-1) <= TOLERANCE_GRAD
        ended = start & opt_cond  # step() returns at once: nothing moves
        # After an inner evaluation, the break conditions of step().
        moved = (self.d * self.t[:, None]).abs().amax(-1) <= TOLERANCE_CHANGE
        flat = (loss - self.prev_loss).abs() < TOLERANCE_CHANGE
        out_of_evals = 1 + self.n_local >= self.max_eval
        ended |= inner & (opt_cond | moved | flat | out_of_evals)
        go = active & ~ended
        self.n_local = torch.where(start, 0, self.n_local)

        self.n_local += go.long()
        self.n_total += go.long()
        first = go & (self.n_total == 1)
        later = go & ~first
        y = g - self.prev_g
        s = self.d * self.t[:, None]
        ys = (y * s).sum(-1)
        update = later & (ys > CURVATURE_EPS)
        # One pass over the memory for g, s and y together (the pass, not the
        # arithmetic, is what costs): the push and the direction share it.
        dots = self.memory.products(torch.stack((g, s, y), dim=1))
        self.memory.push(update, s, y, before=dots[:, 1:])
        self.h_diag = torch.where(update, ys / (y * y).sum(-1), self.h_diag)
        self.memory.reset(first)
        self.h_diag = torch.where(first, 1.0, self.h_diag)
        direction = -g
        if bool(later.any()):
            g_products = self.memory.after_push(dots[:, 0], update, g, s, y)
            direction = self.memory.direction(g, self.h_diag, g_products)
        direction = torch.where(first[:, None], -g, direction)
        self.d = torch.where(go[:, None], direction, self.d)
        self.prev_g = torch.where(go[:, None], g, self.prev_g)
        self.prev_loss = torch.where(go, loss, self.prev_loss)
        # torch's ``min(1.0, 1 / |g|_1)``: Python's min keeps 1.0 unless the
        # other is smaller, so a NaN gradient gives 1.0 (clamp would give NaN).
        inverse = 1.0 / g.abs().sum(-1)
        first_t = torch.where(inverse < 1.0, inverse, 1.0) * self.lr
        self.t = torch.where(first, first_t, torch.where(go, self.lr, self.t))
        gtd = (g * self.d).sum(-1)
        no_descent = go & (gtd > -TOLERANCE_CHANGE)
        ended |= no_descent
        move = go & ~no_descent
        self.z = torch.where(move[:, None], self.z + self.t[:, None] * self.d, self.z)
        ended |= move & (self.n_local == self.max_iter)  # last inner step: no evaluation
        self.at_step_start = torch.where(active, ended, self.at_step_start)
        return ended


class RobustLBFGS:
    """L-BFGS with an Armijo backtracking line search, batched (improved mode).

    Every evaluation is either at a trial point ``z + t d`` (accepted when it
    decreases the loss enough, else the step is halved) or, at the start, at
    `z` itself.  Each accepted trial is one iteration.  A problem that cannot
    find a decrease in `max_trials` halvings forgets its memory and falls back
    to steepest descent.
    """

    c1 = 1e-4
    max_trials = 30

    def __init__(self, z: torch.Tensor, *, lr: float, history: int) -> None:
        n, size = z.shape
        self.lr = lr
        self.z = z.clone()
        self.memory = _Memory(n, size, history, z)
        self.loss = z.new_full((n,), float("inf"))
        self.g = torch.zeros_like(z)
        self.d = torch.zeros_like(z)
        self.t = z.new_zeros(n)
        self.gtd = z.new_zeros(n)
        self.h_diag = z.new_ones(n)
        self.trials = torch.zeros(n, dtype=torch.long, device=z.device)
        self.iterations = torch.zeros_like(self.trials)
        self.trial = torch.zeros(n, dtype=torch.bool, device=z.device)

    def keep(self, rows: torch.Tensor) -> None:
        _keep_rows(self, rows, ("z", "loss", "g", "d", "t", "gtd", "h_diag", "trials",
                                "iterations", "trial"))  # fmt: skip
        self.memory.keep(rows)

    def restart(self, mask: torch.Tensor, z: torch.Tensor) -> None:
        """Start the problems in `mask` afresh from `z` (their next evaluation is at z)."""
        self.z = torch.where(mask[:, None], z, self.z)
        self.loss = torch.where(mask, float("inf"), self.loss)
        self.memory.reset(mask)
        self.h_diag = torch.where(mask, 1.0, self.h_diag)
        self.trial = self.trial & ~mask

    @property
    def points(self) -> torch.Tensor:
        """Where every problem wants its next evaluation."""
        return torch.where(self.trial[:, None], self.z + self.t[:, None] * self.d, self.z)

    def advance(self, loss: torch.Tensor, g: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Consume one evaluation at `points`; returns the problems that moved to a new point."""
        at_point = active & ~self.trial
        sufficient = loss <= self.loss + self.c1 * self.t * self.gtd
        accept = active & self.trial & torch.isfinite(loss) & sufficient
        s = self.t[:, None] * self.d
        y = g - self.g
        ys = (y * s).sum(-1)
        update = accept & (ys > CURVATURE_EPS)
        self.memory.push(update, s, y)
        self.h_diag = torch.where(update, ys / (y * y).sum(-1), self.h_diag)
        self.z = torch.where(accept[:, None], self.z + s, self.z)
        moved = at_point | accept
        self.loss = torch.where(moved, loss, self.loss)
        self.g = torch.where(moved[:, None], g, self.g)
        self.iterations += accept.long()

        reject = active & self.trial & ~accept
        self.trials = torch.where(reject, self.trials + 1, 0)
        self.t = torch.where(reject, self.t * 0.5, self.t)
        stuck = reject & (self.trials >= self.max_trials)
        self.memory.reset(stuck)
        self.h_diag = torch.where(stuck, 1.0, self.h_diag)

        fresh = moved | stuck
        if bool(fresh.any()):
            self._new_direction(fresh)
        self.trial = self.trial | active
        return moved

    def _new_direction(self, mask: torch.Tensor) -> None:
        remembered = self.memory.count > 0
        direction = (
            self.memory.direction(self.g, self.h_diag) if bool(remembered.any()) else -self.g
        )
        gtd = (self.g * direction).sum(-1)
        steepest = ~remembered | ~(gtd < 0)  # no memory yet, or not a descent direction
        self.memory.reset(mask & steepest)
        direction = torch.where(steepest[:, None], -self.g, direction)
        first_t = torch.clamp(1.0 / self.g.abs().sum(-1), max=1.0) * self.lr
        self.d = torch.where(mask[:, None], direction, self.d)
        self.t = torch.where(mask, torch.where(steepest, first_t, self.lr), self.t)
        self.gtd = torch.where(mask, (self.g * self.d).sum(-1), self.gtd)
        self.trials = torch.where(mask, 0, self.trials)


class SplitLBFGS:
    """`FaithfulLBFGS` for rows of two sizes, behind one interface (no refills).

    A batch of DLG and iDLG rows (attack_together) has DLG's variables,
    input and label logits, for every row; an iDLG row's own variable is the
    input alone.  Padding it would give every iDLG row DLG's L-BFGS memory
    (LFW: 100 pairs of 8,821 entries instead of 3,072) and the passes over it;
    here each kind of row has its own optimiser of its own size, and the
    batch sees the padded points.

    Args:
        z: Every row's start, ``(n, size)``.
        narrow: Rows whose variable is the first `prefix` entries only.
        prefix: Their size.
    """

    def __init__(
        self,
        z: torch.Tensor,
        narrow: torch.Tensor,
        prefix: int,
        *,
        lr: float,
        history: int,
        max_iter: int,
    ) -> None:
        self.size, self.prefix = z.shape[1], prefix
        self.narrow = narrow.clone()
        options = {"lr": lr, "history": history, "max_iter": max_iter}
        self.parts = (
            FaithfulLBFGS(z[~narrow], **options),  # type: ignore[arg-type]
            FaithfulLBFGS(z[narrow, :prefix], **options),  # type: ignore[arg-type]
        )
        self._z: torch.Tensor | None = None

    @property
    def z(self) -> torch.Tensor:
        """Every row's point, padded to the full size (with zeros)."""
        if self._z is None:
            wide, narrow = self.parts
            out = wide.z.new_zeros(len(self.narrow), self.size)
            out[~self.narrow] = wide.z
            out[self.narrow, : self.prefix] = narrow.z
            self._z = out
        return self._z

    @property
    def at_step_start(self) -> torch.Tensor:
        out = torch.zeros_like(self.narrow)
        out[~self.narrow] = self.parts[0].at_step_start
        out[self.narrow] = self.parts[1].at_step_start
        return out

    def advance(self, loss: torch.Tensor, g: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """`FaithfulLBFGS.advance` of each part on its own rows and entries."""
        wide, narrow = ~self.narrow, self.narrow
        ended = torch.zeros_like(self.narrow)
        ended[wide] = self.parts[0].advance(loss[wide], g[wide], active[wide])
        ended[narrow] = self.parts[1].advance(
            loss[narrow], g[narrow, : self.prefix], active[narrow]
        )
        self._z = None
        return ended

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (increasing), each part its own of them."""
        kept = torch.zeros_like(self.narrow)
        kept[rows] = True
        for part, mine in zip(self.parts, (~self.narrow, self.narrow), strict=True):
            part.keep(kept[mine].nonzero().flatten())
        self.narrow = self.narrow[rows]
        self._z = None

    def replace(self, rows: torch.Tensor, z: torch.Tensor) -> None:
        raise NotImplementedError("rows of two sizes are not refilled: start them all at once")
