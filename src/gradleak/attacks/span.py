"""The exact span attack on transformers' gradients (DAGER-class).

DAGER: Exact Gradient Inversion for Large Language Models (Petrov, Dimitrov,
Baader, Müller, Vechev; NeurIPS 2024), https://arxiv.org/abs/2405.15586.

A linear layer's weight gradient over a batch is a sum of outer products
``sum_t dy_t x_t^T``, so its row space is spanned by that layer's inputs
``x_t``, as long as the batch's distinct inputs are fewer than the layer's
width.  The first attention block's query/key/value inputs are the
normalised token embeddings (plus the position's embedding where positions
are learned, GPT-2 and BERT; position-free where they are rotary, LLaMA), so
the attack checks every vocabulary token against that span and keeps those
that lie in it: the batch's tokens per position.  For a decoder, causal
masking makes the second block's input at position t a function of tokens
0..t only, so each recovered prefix is extended by each candidate token and
kept when its second-block input lies in the second block's span: the
batch's sequences, exactly, without any optimisation.

Rules (measured in the README):

- Rank: the gradient's numerical rank is the number of singular values above
  ``rank_tolerance`` times the largest.  When it reaches ``width -
  rank_margin`` the span holds (nearly) every vector and says nothing: the
  attack says so up front (``applicable=False``) instead of guessing.  The
  first block must hold the batch's distinct inputs (for learned positions
  added to the tokens, about distinct tokens + positions); a decoder's second
  block must hold every visible position (B x length), since each depends on
  its whole prefix.
- Threshold: a unit vector ``v`` lies in the span when ``||v - R R^T v||`` is
  below ``layer1_threshold`` (first block) or ``layer2_threshold`` (second).
- LoRA: only the adapters' gradients are shared.  The gradient of an adapter's
  ``A`` (r x width) is ``(dY B)^T X``: its rows still lie in the inputs' span,
  but its rank is at most r, so the span holds at most r distinct inputs
  (capacity r instead of the width); a fresh adapter (``B = 0``) gives ``A`` a
  zero gradient.
- FedAvg: an update of K local steps is ``-lr`` times a sum of gradients at
  slightly moved weights, sent back in float32; its span is the inputs' span
  only approximately, which the ``update`` tolerances absorb while the
  learning rate is moderate (1e-3 on the models here: at 1e-4 the float32
  difference of the weights is too coarse, at 1e-2 the inputs drift too far).

What is not recovered: a decoder's last token (``</s>`` here) enters no loss
and no later position, so it is invisible; the attack appends ``eos``.  A
sequence that is a strict prefix of another is found only as the longer one.
With rotary positions, one token repeated (``a a a``) is indistinguishable
in the second block from ``a`` alone at position 0, so such runs are never
extended.
Encoders: bidirectional attention makes every second-block input depend on the
whole sequence, so a batch of more than one sequence is recovered by DAGER's
combination search over the per-position candidates (`span_encoder.py`: pruning,
lengths from ``</s>``, random-start ICM under a budget); every sequence returned
passes the second-block check at every position, and sequences the budget did
not reach are missing, never guessed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradleak.attacks.threads import attack_threads
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.types import Observation, UpdateObservation

log = logging.getLogger(__name__)

# The first block's query/key/value projections, per model family (transformers names).
PROJECTIONS = {
    "gpt2": ("transformer.h.{}.attn.", ("c_attn",)),
    "llama": ("model.layers.{}.self_attn.", ("q_proj", "k_proj", "v_proj")),
    "mistral": ("model.layers.{}.self_attn.", ("q_proj", "k_proj", "v_proj")),
    "qwen2": ("model.layers.{}.self_attn.", ("q_proj", "k_proj", "v_proj")),
    "bert": ("encoder.layer.{}.attention.self.", ("query", "key", "value")),
}


@dataclass(frozen=True)
class SpanConfig:
    """How the span attack decides rank and membership.

    Attributes:
        rank_tolerance: Singular values above this share of the largest count
            towards the rank (the gradient is float32: about 1e-7 is noise).
        rank_margin: The span is full (no information) at rank >= width - margin
            (DAGER's cap).
        layer1_threshold: Largest relative distance to the first block's span
            for a candidate token.
        layer2_threshold: The same for an extended prefix in the second block.
        update_scale: Thresholds are multiplied by this for a FedAvg update.
        update_rank_tolerance: `rank_tolerance` for a FedAvg update: the
            weights' float32 difference and the inputs' drift over the local
            steps add small singular values that are not the batch's.
        max_prefixes: Keep at most this many prefixes per position (the closest).
        chunk: Vocabulary rows checked at once (memory).
        search_starts: An encoder's combination search (B > 1) makes at most this many
            random starts (0: no search, per-position candidates only).
        search_seconds: ... and stops its next round after this many seconds.
        search_threshold: `layer2_threshold` for the encoder's whole-sequence check:
            tighter, because the search tries thousands of near-true combinations and
            on narrow models (width 64) a few of those fall below 1e-3 (true sequences
            sit below 1e-4).
    """

    rank_tolerance: float = 1e-7
    rank_margin: int = 20
    layer1_threshold: float = 1e-3
    layer2_threshold: float = 1e-3
    update_scale: float = 30.0
    update_rank_tolerance: float = 1e-4
    max_prefixes: int = 4096
    chunk: int = 8192
    search_starts: int = 512
    search_seconds: float = 45.0
    search_threshold: float = 2e-4

    def __post_init__(self) -> None:
        if min(self.rank_tolerance, self.layer1_threshold, self.layer2_threshold,
               self.search_threshold) <= 0:  # fmt: skip
            raise ConfigError("the span attack's tolerances must be positive")


@dataclass(frozen=True)
class SpanReconstruction:
    """What the span attack recovered.

    Attributes:
        sequences: Recovered sequences (token ids, frame included), as a set
            (the batch's order is not in the gradient).
        candidates: Tokens found by the first block, per position (learned
            positions) or one position-free set (rotary models).
        rank: Numerical rank of the first block's gradient.
        width: Its input width (the most it can hold).
        applicable: False when the span is full; then nothing is recovered.
        reason: Why not applicable, else "".
        seconds: Time of the attack.
        search_starts: Random starts an encoder's combination search made.
    """

    sequences: tuple[tuple[int, ...], ...]
    candidates: tuple[tuple[int, ...], ...]
    rank: int
    width: int
    applicable: bool = True
    reason: str = ""
    seconds: float = 0.0
    search_starts: int = 0


class SpanAttack:
    """DAGER's exact span attack (Petrov et al., NeurIPS 2024).

    Configure once (`SpanConfig`), call on an observation of a decoder's
    next-token step or an encoder's masked-LM step, full fine-tuning or LoRA,
    FedSGD or FedAvg: ``SpanAttack()(observation, eos=...)``.
    """

    def __init__(self, config: SpanConfig | None = None, **overrides: object) -> None:
        self.config = dataclasses.replace(config or SpanConfig(), **overrides)

    def __repr__(self) -> str:
        return f"SpanAttack({self.config})"

    def __call__(
        self, observation: Observation | UpdateObservation, *, eos: int
    ) -> SpanReconstruction:
        """Recover the batch's sequences.

        Args:
            observation: The client's gradient (`Observation`) or update
                (`UpdateObservation`, treated as ``-update / lr``).
            eos: The token that ends every sequence (the protocol's, public).

        Raises:
            AttackNotApplicable: The gradient lacks the projections the attack
                reads, or they are all zero, or the model family is unknown.
        """
        with attack_threads(observation.device), torch.no_grad():
            start = time.perf_counter()
            result = _Run(self.config, observation, eos).recover()
            return dataclasses.replace(result, seconds=time.perf_counter() - start)


def shared_gradients(observation: Observation | UpdateObservation) -> dict[str, torch.Tensor]:
    """Name -> gradient; for an update, ``-update / lr`` (the sum of its steps' gradients)."""
    if isinstance(observation, UpdateObservation):
        scale = -1.0 / observation.local_lr
        return {
            n: u * scale
            for n, u in zip(observation.parameter_names, observation.update, strict=True)
        }
    return dict(zip(observation.parameter_names, observation.gradients, strict=True))


def span_basis(
    matrices: list[torch.Tensor], *, rank_tolerance: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Orthonormal bases of the span of the matrices' columns and of its complement.

    Each matrix is ``(width, k)``; returns ``(R, N, rank)`` with ``R``
    ``(width, rank)`` and ``N`` ``(width, width - rank)``, in float64.
    """
    stacked = torch.cat([m.to(torch.float64) for m in matrices], dim=1)
    u, s, _ = torch.linalg.svd(stacked, full_matrices=True)
    rank = int((s > rank_tolerance * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    return u[:, :rank], u[:, rank:], rank


def span_distance(vectors: torch.Tensor, complement: torch.Tensor) -> torch.Tensor:
    """Relative distance of each row of `vectors` to the span: ``||N^T v|| / ||v||``."""
    v = vectors.to(complement.dtype)
    norm = v.norm(dim=-1)
    distance = (v @ complement).norm(dim=-1) / norm.clamp_min(1e-30)
    # A zero vector (a padding row of zeros, after the norm) lies in every span and says
    # nothing: it is never taken as an input.
    return distance.masked_fill(norm <= 1e-12 * norm.max().clamp_min(1e-30), 1.0)


class _Run:
    """One attack: the model's anatomy, the two spans, the search."""

    def __init__(
        self, config: SpanConfig, observation: Observation | UpdateObservation, eos: int
    ) -> None:
        self.config = config
        self.eos = eos
        model = observation.model
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.family = str(self.base.config.model_type)
        if self.family not in PROJECTIONS:
            raise AttackNotApplicable(
                f"the span attack knows {', '.join(PROJECTIONS)} models, not '{self.family}'"
            )
        self.decoder = self.family != "bert"
        update = isinstance(observation, UpdateObservation)
        self.scale = config.update_scale if update else 1.0
        self.rank_tolerance = config.update_rank_tolerance if update else config.rank_tolerance
        self.grads = shared_gradients(observation)
        self.width = int(self.base.config.hidden_size)
        self.vocab = int(self.base.get_input_embeddings().weight.shape[0])
        self.dtype = torch.float32
        self.device = observation.device

    def _projection_matrices(self, layer: int) -> list[torch.Tensor]:
        """The layer's query/key/value weight (or LoRA A) gradients as ``(width, k)``."""
        prefix, names = PROJECTIONS[self.family]
        key = prefix.format(layer)
        found = []
        for name, grad in self.grads.items():
            if key not in name:
                continue
            for proj in names:
                if name.endswith(f"{proj}.lora_A.default.weight") or name.endswith(
                    f"{proj}.lora_A.weight"
                ):
                    found.append(grad.T)  # (r, width): rows in the inputs' span
                elif name.endswith(f"{proj}.weight"):
                    # GPT-2's Conv1D stores (in, out); nn.Linear (out, in).
                    found.append(grad if self.family == "gpt2" else grad.T)
        if not found:
            raise AttackNotApplicable(
                f"the gradient lacks layer {layer}'s attention projections ({key}"
                f"{'/'.join(names)}), which the span attack reads: share them, or use "
                "--method tag"
            )
        if all(float(m.abs().max()) == 0 for m in found):
            raise AttackNotApplicable(
                f"layer {layer}'s projection gradients are all zero (a fresh LoRA adapter, "
                "B = 0, gives A no gradient): the span attack needs a trained adapter"
            )
        return found

    def recover(self) -> SpanReconstruction:
        config = self.config
        first = self._projection_matrices(0)
        _, null1, rank = span_basis(first, rank_tolerance=self.rank_tolerance)
        capacity = min(self.width - config.rank_margin, sum(m.shape[1] for m in first))
        if rank >= capacity:
            reason = (
                f"the first block's gradient has rank {rank}, the most it can show is "
                f"{capacity}: the batch holds more distinct token inputs than the span can "
                "tell apart (use fewer or shorter sequences, or a larger LoRA rank)"
            )
            log.warning("span attack not applicable: %s", reason)
            return SpanReconstruction((), (), rank, self.width, applicable=False, reason=reason)
        null1 = null1.to(self.dtype)
        threshold1 = config.layer1_threshold * self.scale
        if self.family in ("gpt2", "bert"):  # learned positions: one set per position
            found: list[tuple[int, ...]] = []
            for t in range(self._context()):
                inside = self._chunks(lambda ids, t=t: self._first_inputs(ids, t), null1)
                tokens = tuple((inside < threshold1).nonzero().flatten().tolist())
                if not tokens:
                    break  # sequences are contiguous: no token here, none later
                found.append(tokens)
            candidates = tuple(found)
        else:  # rotary: the first block sees no position, one set for all
            inside = self._chunks(lambda ids: self._first_inputs(ids, None), null1)
            candidates = (tuple((inside < threshold1).nonzero().flatten().tolist()),)
        log.info("span attack: rank %d of %d, candidates %s", rank, self.width,
                 [len(c) for c in candidates])  # fmt: skip
        if not self.decoder and all(len(c) == 1 for c in candidates) and candidates:
            sequence = tuple(c[0] for c in candidates)  # one sequence: nothing to combine
            return SpanReconstruction((sequence,), candidates, rank, self.width)
        if not self.decoder and config.search_starts <= 0:
            return SpanReconstruction((), candidates, rank, self.width)
        second = self._projection_matrices(1)
        _, null2, rank2 = span_basis(second, rank_tolerance=self.rank_tolerance)
        if rank2 >= self.width - config.rank_margin:
            # Every visible position has its own second-block input (it depends on the
            # whole prefix): B x length must stay below the width, not just the tokens.
            reason = (
                f"the second block's gradient has rank {rank2} of width {self.width}: the "
                "batch's B x length visible positions exceed what its span can hold, so "
                "prefixes cannot be checked (use fewer or shorter sequences)"
            )
            log.warning("span attack not applicable: %s", reason)
            return SpanReconstruction(
                (), candidates, rank, self.width, applicable=False, reason=reason
            )
        if not self.decoder:
            return self._combine(candidates, null2.to(self.dtype), rank)
        sequences = self._extend(candidates, null2.to(self.dtype))
        return SpanReconstruction(tuple(sequences), candidates, rank, self.width)

    def _combine(
        self, candidates: tuple[tuple[int, ...], ...], null2: torch.Tensor, rank: int
    ) -> SpanReconstruction:
        """An encoder's batch: DAGER's combination search (`span_encoder.py`)."""
        # Imported here: span_encoder imports span_distance from this module.
        from gradleak.attacks.span_encoder import BertBlockZero, EncoderSearch, SearchLimits

        config = self.config
        limits = SearchLimits(max_restarts=config.search_starts, max_seconds=config.search_seconds)
        search = EncoderSearch(
            BertBlockZero(self.base, self._embed), candidates, null2,
            threshold=config.search_threshold * self.scale, eos=self.eos, limits=limits,
            device=self.device,
        )  # fmt: skip
        sequences, info = search.run()
        log.info("span attack: encoder search %s, %d sequences", info, len(sequences))
        return SpanReconstruction(
            tuple(sequences), candidates, rank, self.width, search_starts=search.restarts
        )

    def _context(self) -> int:
        config = self.base.config
        return int(getattr(config, "n_positions", None) or config.max_position_embeddings)

    def _chunks(self, inputs_of, null: torch.Tensor) -> torch.Tensor:
        """Distance of every vocabulary token's first-block input to the span."""
        out = []
        for start in range(0, self.vocab, self.config.chunk):
            ids = torch.arange(
                start, min(start + self.config.chunk, self.vocab), device=self.device
            )
            out.append(span_distance(inputs_of(ids), null))
        return torch.cat(out)

    # -- the model's anatomy -------------------------------------------------------------

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """Residual stream entering block 0 (token + learned position embedding)."""
        base = self.base
        if self.family == "gpt2":
            return base.transformer.wte(ids) + base.transformer.wpe(positions)
        if self.family == "bert":
            emb = base.bert.embeddings
            x = emb.word_embeddings(ids) + emb.position_embeddings(positions)
            x = x + emb.token_type_embeddings(torch.zeros_like(ids))
            return emb.LayerNorm(x)
        return base.model.embed_tokens(ids)

    def _first_inputs(self, ids: torch.Tensor, position: int | None) -> torch.Tensor:
        """Block 0's query/key/value inputs for tokens `ids` at `position`."""
        pos = None if position is None else torch.full_like(ids, position)
        x = self._embed(ids, pos)
        return self._norm(0, x)

    def _norm(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.family == "gpt2":
            return self.base.transformer.h[layer].ln_1(x)
        if self.family == "bert":
            return x  # post-LN: the block's input goes straight into Q/K/V
        return self.base.model.layers[layer].input_layernorm(x)

    def _block0_last(self, prefixes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Block 0's output at position t for every (prefix, next token): ``(P, C, width)``.

        `prefixes` is ``(P, t)``; causal attention over the prefix and the new token.
        """
        p, t = prefixes.shape
        c = tokens.shape[0]
        positions = torch.arange(t + 1, device=self.device)
        x_prefix = self._embed(prefixes, positions[:t].expand(p, t)) if t else None
        x_new = self._embed(tokens, positions[t].expand(c))
        if self.family == "gpt2":
            block = self.base.transformer.h[0]
            attn = block.attn
            heads, dim = attn.num_heads, attn.head_dim
            q, k, v = attn.c_attn(block.ln_1(x_new)).split(attn.split_size, dim=-1)
            q, k, v = (z.view(c, heads, dim) for z in (q, k, v))
            if t:
                _, kp, vp = attn.c_attn(block.ln_1(x_prefix)).split(attn.split_size, dim=-1)
                kp, vp = kp.view(p, t, heads, dim), vp.view(p, t, heads, dim)
            out = _attend(q, k, v, kp if t else None, vp if t else None, 1 / math.sqrt(dim))
            h = x_new + attn.c_proj(out.reshape(p, c, heads * dim))
            return h + block.mlp(block.ln_2(h))
        layer = self.base.model.layers[0]
        attn = layer.self_attn
        config = self.base.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", heads)
        dim = getattr(config, "head_dim", None) or self.width // heads
        rotary = self.base.model.rotary_emb
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        def project(x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, ...]:
            a = layer.input_layernorm(x)  # (n, s, width)
            n, s, _ = a.shape
            q = attn.q_proj(a).view(n, s, heads, dim).transpose(1, 2)
            k = attn.k_proj(a).view(n, s, kv_heads, dim).transpose(1, 2)
            v = attn.v_proj(a).view(n, s, kv_heads, dim).transpose(1, 2)
            cos, sin = rotary(v, pos.expand(n, s))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            repeat = heads // kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (n, s, H, D)

        q, k, v = (z[:, 0] for z in project(x_new.unsqueeze(1), positions[t:].unsqueeze(0)))
        if t:
            _, kp, vp = project(x_prefix, positions[:t].unsqueeze(0))
        out = _attend(q, k, v, kp if t else None, vp if t else None, 1 / math.sqrt(dim))
        h = x_new + attn.o_proj(out.reshape(p, c, heads * dim))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    # -- the decoder's search ------------------------------------------------------------

    def _extend(
        self, candidates: tuple[tuple[int, ...], ...], null2: torch.Tensor
    ) -> list[tuple[int, ...]]:
        config = self.config
        threshold2 = config.layer2_threshold * self.scale
        rotary = self.family not in ("gpt2", "bert")
        limit = self._context() if rotary else len(candidates)
        prefixes = torch.zeros((1, 0), dtype=torch.long, device=self.device)
        finished: list[tuple[int, ...]] = []
        for t in range(limit):
            tokens = torch.tensor(
                candidates[0] if rotary else candidates[t],
                dtype=torch.long, device=self.device,
            )  # fmt: skip
            if tokens.numel() == 0 or prefixes.shape[0] == 0:
                finished += [tuple(r) for r in prefixes.tolist()]
                prefixes = prefixes[:0]
                break
            distance = torch.cat(
                [
                    span_distance(self._norm(1, self._block0_last(part, tokens)), null2)
                    for part in prefixes.split(max(1, 65536 // max(1, tokens.numel() * (t + 1))))
                ]
            )  # (P, C)
            passing = distance < threshold2
            if rotary and t:
                # A prefix made of one token repeated, extended by that token, attends
                # uniformly to equal values at every step: its second-block input is that
                # of the token alone at position 0, in the span but not in the batch.
                same = (prefixes == prefixes[:, :1]).all(dim=1, keepdim=True)
                passing &= ~(same & (tokens.unsqueeze(0) == prefixes[:, :1]))
            ends = ~passing.any(dim=1)
            finished += [tuple(r) for r in prefixes[ends].tolist()]
            rows, cols = passing.nonzero(as_tuple=True)
            if rows.numel() > config.max_prefixes:
                log.warning("span attack: %d prefixes at position %d, keeping the closest %d",
                            rows.numel(), t, config.max_prefixes)  # fmt: skip
                keep = distance[rows, cols].argsort()[: config.max_prefixes]
                rows, cols = rows[keep], cols[keep]
            prefixes = torch.cat([prefixes[rows], tokens[cols].unsqueeze(1)], dim=1)
        finished += [tuple(r) for r in prefixes.tolist()]
        return [seq + (self.eos,) for seq in finished if seq]


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_prefix: torch.Tensor | None,
    v_prefix: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of each new token (``(C, H, D)``) over each prefix (``(P, t, H, D)``) and itself.

    Returns ``(P, C, H, D)``.
    """
    own = (q * k).sum(-1) * scale  # (C, H)
    if k_prefix is None:
        return v.unsqueeze(0)
    scores = torch.einsum("chd,pthd->pcht", q, k_prefix) * scale
    p = k_prefix.shape[0]
    scores = torch.cat([scores, own.expand(p, *own.shape).unsqueeze(-1)], dim=-1)
    weights = F.softmax(scores, dim=-1)
    out = torch.einsum("pcht,pthd->pchd", weights[..., :-1], v_prefix)
    return out + weights[..., -1:] * v.unsqueeze(0)
