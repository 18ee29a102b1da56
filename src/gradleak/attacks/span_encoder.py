"""DAGER's combination search for encoders: per-position candidates -> whole sequences.

An encoder's first block gives each position's candidate tokens (`span.py`), but its
attention is bidirectional: block 0's output at a position, the second block's input,
depends on the whole sequence, so sequences cannot be grown token by token as for a
decoder.  This module searches the combinations of the candidates and keeps a sequence
only when its second-block input at every position lies in the second block's span
(DAGER's check, so a reported sequence is never a guess).

The search, in three steps (measured in the README's span section):

1. Prune: BERT's first block passes far more tokens than the batch holds at a position
   (80 of 80 distinct batch tokens at B = 8 on bert-base).  Its inputs are
   ``LayerNorm(token + position)``, a scaled centred sum: with token a at positions s and
   u and token b at s, b at u is ``(b + s) - (a + s) + (a + u)``, in the span.  A
   position's own second-block distance, given a plausible rest of the sequence,
   separates the tokens the batch holds there (near 0.02 on the seeded models) from
   those it does not (near 0.1): the rest is refined twice (each position set to its
   closest candidate), the distances of all (position, token) pairs are pooled, and the
   largest gap between consecutive ones (at least `prune_gap` times) splits kept from
   dropped.
2. Lengths: ``</s>`` kept at position t means a sequence of length t + 1.
3. Per length, iterated conditional modes (ICM) from random starts: every position in
   turn is set to its kept token whose own second-block distance is smallest given the
   rest, until nothing changes.  The seeded models' attention is near uniform, so a
   position's input is mostly its own token plus the sequence's mean value: a start
   made mostly of one sequence's tokens descends to that sequence (the majority wins).
   Lengths run longest first (a shorter length's positions also hold the longer
   sequences' tokens), and each start draws, per position, among the tokens no found
   sequence (of any length) holds there (all of them where every one is held:
   sequences can share a token), so later starts lead to new sequences.  `starts` of
   them run side by side (the weights are read once for all); a start ends when it
   passes the check at every position, when a sweep changes nothing, or when it is
   three quarters a found sequence; a length is done after `patience` rounds that find
   nothing new.

It is capped by `max_restarts` starts and `max_seconds`; a cap of 0 returns no sequence
(candidates only).  Sequences it does not reach are missing, never guessed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradleak.attacks.span import span_distance

Embed = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class BertBlockZero:
    """BERT's block 0 (post-LN, bidirectional attention) on whole candidate sequences.

    `embed(ids, positions)` is the block's input (the embeddings' LayerNorm output).
    """

    def __init__(self, base: torch.nn.Module, embed: Embed) -> None:
        self.layer = base.bert.encoder.layer[0]
        self.embed = embed
        attention = self.layer.attention.self
        self.heads = int(attention.num_attention_heads)
        self.dim = int(attention.attention_head_size)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Query, key, value of inputs ``(..., width)`` as ``(..., heads, dim)``."""
        attention = self.layer.attention.self
        shape = (*x.shape[:-1], self.heads, self.dim)
        return (
            attention.query(x).view(shape),
            attention.key(x).view(shape),
            attention.value(x).view(shape),
        )

    def finish(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The block's output from its input and the attention's heads ``(..., heads, dim)``."""
        layer = self.layer
        flat = context.reshape(*context.shape[:-2], self.heads * self.dim)
        h = layer.attention.output.LayerNorm(layer.attention.output.dense(flat) + x)
        inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(h))
        return layer.output.LayerNorm(layer.output.dense(inner) + h)

    def sequences(self, ids: torch.Tensor) -> torch.Tensor:
        """Block 0's output ``(S, L, width)`` for whole sequences ``(S, L)`` (no padding)."""
        s, length = ids.shape
        x = self.embed(ids, torch.arange(length, device=ids.device).expand(s, length))
        q, k, v = self.project(x)
        scores = torch.einsum("sihd,sjhd->shij", q, k) / math.sqrt(self.dim)
        context = torch.einsum("shij,sjhd->sihd", F.softmax(scores, dim=-1), v)
        return self.finish(x, context)


@dataclass(frozen=True)
class SearchLimits:
    """How much the search may do and how it splits candidates.

    Attributes:
        max_restarts: Random starts at most, all lengths together (0: no search).
        max_seconds: Time at most; the round in progress finishes.
        starts: Random starts run side by side (one round; batched, so that each
            weight matrix is read once for all of them).
        max_sweeps: Passes over the positions per start.
        patience: A length's search stops after this many rounds in a row that find
            nothing new.
        prune_gap: A gap between consecutive pooled distances must be at least this
            ratio to split kept tokens from dropped ones (else all are kept).
        seed: Seed of the random starts.
    """

    max_restarts: int = 512
    max_seconds: float = 45.0
    starts: int = 16
    max_sweeps: int = 8
    patience: int = 2
    prune_gap: float = 2.0
    seed: int = 0


class EncoderSearch:
    """One search over an encoder's candidates (see the module's docstring)."""

    def __init__(
        self,
        block: BertBlockZero,
        candidates: tuple[tuple[int, ...], ...],
        null2: torch.Tensor,
        *,
        threshold: float,
        eos: int,
        limits: SearchLimits,
        device: torch.device | str = "cpu",
    ) -> None:
        self.block = block
        self.candidates = candidates
        self.null2 = null2
        self.threshold = threshold
        self.eos = eos
        self.limits = limits
        self.device = device
        # Each (position, token) pair's input and projections are fixed: computed once.
        self.tokens = [torch.tensor(c, dtype=torch.long, device=device) for c in candidates]
        self.x, self.q, self.k, self.v = [], [], [], []
        for t, ids in enumerate(self.tokens):
            x = block.embed(ids, torch.full_like(ids, t))
            q, k, v = block.project(x)
            self.x.append(x)
            self.q.append(q)
            self.k.append(k)
            self.v.append(v)
        self.restarts = 0
        self.pruned: list[list[int]] = []  # indices into each position's candidates
        self.start: list[int] = []

    # -- one position's own distance given the rest ---------------------------------------

    def _keys(self, assignment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(R, L, H, D)`` of assignments ``(R, L)`` (candidate indices)."""
        length = assignment.shape[1]
        k = torch.stack([self.k[j][assignment[:, j]] for j in range(length)], dim=1)
        v = torch.stack([self.v[j][assignment[:, j]] for j in range(length)], dim=1)
        return k, v

    def _own(
        self, keys: torch.Tensor, values: torch.Tensor, t: int, choices: torch.Tensor
    ) -> torch.Tensor:
        """Distance ``(R, C)`` at position t for each choice there, the rest as given.

        `keys`/`values` are the assignments' ``(R, L, H, D)``; attention runs over
        those L positions only, row t replaced by the choice's.
        """
        q_c, k_c, v_c, x_c = (
            self.q[t][choices],
            self.k[t][choices],
            self.v[t][choices],
            self.x[t][choices],
        )
        scale = 1 / math.sqrt(self.block.dim)
        scores = torch.einsum("chd,rjhd->rchj", q_c, keys) * scale  # (R, C, H, L)
        scores[..., t] = (q_c * k_c).sum(-1) * scale
        weights = F.softmax(scores, dim=-1)
        context = torch.einsum("rchj,rjhd->rchd", weights, values)
        context = context + weights[..., t, None] * (v_c.unsqueeze(0) - values[:, t, None])
        out = self.block.finish(x_c.expand(keys.shape[0], *x_c.shape), context)
        return span_distance(out, self.null2)

    def _refine(
        self, assignment: torch.Tensor, free: list[int], allowed: list[torch.Tensor]
    ) -> torch.Tensor:
        """One sweep, each free position to its closest allowed token; which rows changed."""
        keys, values = self._keys(assignment)
        changed = torch.zeros(assignment.shape[0], dtype=torch.bool, device=self.device)
        for t in free:
            choices = allowed[t]
            if choices.numel() < 2:
                continue
            best = choices[self._own(keys, values, t, choices).argmin(dim=1)]
            changed |= best != assignment[:, t]
            assignment[:, t] = best
            keys[:, t], values[:, t] = self.k[t][best], self.v[t][best]
        return changed

    # -- the three steps ------------------------------------------------------------------

    def prune(self) -> list[list[int]]:
        """Per position, the candidates the batch holds there (indices)."""
        count = len(self.candidates)
        every = [torch.arange(len(c), device=self.device) for c in self.candidates]
        assignment = torch.zeros((1, count), dtype=torch.long, device=self.device)
        for _ in range(2):
            self._refine(assignment, list(range(count)), every)
        keys, values = self._keys(assignment)
        distances = [self._own(keys, values, t, every[t])[0] for t in range(count)]
        pooled = torch.cat(distances[1:]) if count > 1 else torch.zeros(0)
        pooled = pooled[pooled >= self.threshold].sort().values  # exact fits are kept anyway
        cut = float("inf")
        if pooled.numel() > 1:
            ratio = pooled[1:] / pooled[:-1].clamp_min(1e-30)
            at = int(ratio.argmax())
            if float(ratio[at]) >= self.limits.prune_gap:
                cut = float(pooled[at + 1])
        kept = []
        for d in distances:
            inside = (d < cut).nonzero().flatten().tolist()
            kept.append(inside or [int(d.argmin())])
        self.pruned = kept
        self.start = assignment[0].tolist()
        return kept

    def lengths(self) -> list[int]:
        """Sequence lengths: where ``</s>`` is kept (at least position 1)."""
        return [
            t + 1
            for t in range(1, len(self.candidates))
            if any(self.candidates[t][i] == self.eos for i in self.pruned[t])
        ]

    def run(self) -> tuple[list[tuple[int, ...]], dict[str, object]]:
        """The sequences found (each checked at every position) and what the search did."""
        start = time.perf_counter()
        limits = self.limits
        info: dict[str, object] = {"restarts": 0, "stopped": "done"}
        if limits.max_restarts <= 0 or len(self.candidates) < 2:
            info["stopped"] = "no search (budget 0)" if limits.max_restarts <= 0 else "done"
            return [], info
        self.prune()
        lengths = self.lengths()
        info["kept_per_position"] = [len(p) for p in self.pruned]
        info["lengths"] = lengths
        found: list[tuple[int, ...]] = []
        generator = torch.Generator().manual_seed(limits.seed)
        held: list[tuple[int, ...]] = []  # every found sequence, as indices
        for length in sorted(lengths, reverse=True):
            ends = [
                i for i in self.pruned[length - 1] if self.candidates[length - 1][i] == self.eos
            ]
            allowed = [
                [i for i in self.pruned[t] if self.candidates[t][i] != self.eos]
                for t in range(length - 1)
            ] + [ends]
            if any(not a for a in allowed):
                continue
            choices = [torch.tensor(a, dtype=torch.long, device=self.device) for a in allowed]
            mine: list[tuple[int, ...]] = []  # found sequences of this length, as indices
            free = list(range(1, length - 1))
            stale = 0
            while stale < limits.patience:
                if (
                    self.restarts >= limits.max_restarts
                    or time.perf_counter() - start > limits.max_seconds
                ):
                    info["stopped"] = "budget"
                    break
                size = min(limits.starts, limits.max_restarts - self.restarts)
                self.restarts += size
                new = self._round(size, allowed, choices, free, mine, held, generator)
                held += new
                found += [self._ids(a) for a in new]
                stale = 0 if new else stale + 1
            if info["stopped"] == "budget":
                break
        info["restarts"] = self.restarts
        return found, info

    def _round(
        self,
        size: int,
        allowed: list[list[int]],
        choices: list[torch.Tensor],
        free: list[int],
        mine: list[tuple[int, ...]],
        held: list[tuple[int, ...]],
        generator: torch.Generator,
    ) -> list[tuple[int, ...]]:
        """`size` random starts side by side; the new checked sequences (appended to `mine`).

        A start ends when it passes the check, when a sweep changes nothing, or when it
        is mostly (three quarters of its free positions) a found sequence: heading there.
        """
        rows = torch.tensor(
            [self._initial(allowed, held, generator) for _ in range(size)],
            dtype=torch.long, device=self.device,
        )  # fmt: skip
        new: list[tuple[int, ...]] = []
        for _ in range(self.limits.max_sweeps):
            changed = self._refine(rows, free, choices)
            passes = self._passes(rows)
            keep = []
            for r, row in enumerate(rows.tolist()):
                if tuple(row) in mine:
                    continue
                if passes[r]:
                    mine.append(tuple(row))
                    new.append(tuple(row))
                    continue
                near = any(sum(row[t] == seq[t] for t in free) * 4 >= 3 * len(free) for seq in mine)
                if changed[r] and not near:
                    keep.append(r)
            if not keep:
                break
            rows = rows[keep]
        return new

    def _ids(self, assignment: tuple[int, ...] | list[int]) -> tuple[int, ...]:
        return tuple(self.candidates[t][i] for t, i in enumerate(assignment))

    def _passes(self, rows: torch.Tensor) -> list[bool]:
        """DAGER's check: each whole sequence's second-block input in the span everywhere."""
        ids = torch.stack([self.tokens[t][rows[:, t]] for t in range(rows.shape[1])], dim=1)
        out = self.block.sequences(ids)
        return (span_distance(out, self.null2) < self.threshold).all(dim=1).tolist()

    def _initial(
        self, allowed: list[list[int]], held: list[tuple[int, ...]], generator: torch.Generator
    ) -> list[int]:
        """A random start, each position drawn among tokens no found sequence holds there.

        (Where every token is held, among all: two sequences can share a token.)  A start
        mostly from one sequence's tokens descends to it, so fresh tokens lead to new ones.
        """
        assignment = []
        for t, options in enumerate(allowed):
            used = {seq[t] for seq in held if len(seq) > t}
            pool = [i for i in options if i not in used] or options
            assignment.append(pool[int(torch.randint(len(pool), (1,), generator=generator))])
        return assignment
