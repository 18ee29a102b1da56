"""`gradleak attack-text` on a batch: a decoder or encoder, one client step, every method.

The client fine-tunes a built-in model (`models/text_lm.py`) or one saved in a
folder on its private sentences (one FedSGD step, or several local SGD steps;
full fine-tuning or LoRA); the server runs the span attack (`span`), the
TAG-style baseline (`tag`) or both on what it received.  Scores per sentence:
exact (the recovered sequence equals it), token accuracy (position by
position over the sentence's tokens), ROUGE-1/2 F1 over lowercase words.
Recovered sequences come as a set; each sentence is paired with one of them
by an optimal assignment on token accuracy.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from gradleak.attacks.span import SpanAttack, SpanConfig
from gradleak.attacks.tag import StepCallback, TagAttack, TagConfig
from gradleak.errors import ConfigError
from gradleak.experiments.common import resolve_device, use_cpu_threads, write_json
from gradleak.models.text_lm import (
    BUILTIN,
    LanguageModel,
    LoraSetup,
    build_language_model,
    encode_batch,
    load_language_model,
    observe_batch,
)
from gradleak.outdir import prepare_out

SENTENCES_FILE = Path(__file__).with_name("sentences.txt")
METHODS = ("span", "tag", "dlg")


def shipped_sentences() -> list[str]:
    """The package's private sentences (written for gradleak), one a line."""
    return SENTENCES_FILE.read_text(encoding="utf-8").splitlines()


def read_sentences(path: str | None, batch_size: int | None) -> list[str]:
    """The client's batch: the first `batch_size` lines of `path` (or the shipped set)."""
    if path is None:
        lines = shipped_sentences()
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            raise ConfigError(f"sentences file '{path}' not found: give a text file, one a line")
        try:
            lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError:
            raise ConfigError(f"'{path}' is not UTF-8 text: give one sentence a line") from None
        lines = [line for line in lines if line]
        if not lines:
            raise ConfigError(f"'{path}' holds no sentence: give one sentence a line")
    size = len(lines) if batch_size is None else batch_size
    if size > len(lines):
        raise ConfigError(
            f"--batch-size {size} but {path or 'the shipped set'} holds {len(lines)} sentences"
        )
    return lines[:size]


@dataclass(frozen=True)
class BatchAttackRun:
    """One `gradleak attack-text` on a batch.

    Attributes:
        sentences: The client's private sentences.
        model: A built-in name (`BUILTIN`) or a save_pretrained folder.
        methods: Attacks to run on the same observation ("span", "tag").
        layers: Override the built-in model's depth (None: its own).
        lora_rank: LoRA adapters of this rank on the attention projections (0: full).
        local_steps: Client SGD steps (1: FedSGD).
        local_lr: Their learning rate.
        tag_iterations: The TAG baseline's Adam steps.
        fallback: When the span is full, run TAG instead.
        seed: Seed of the built-in model, the adapters and TAG's start.
        device: "auto", "cpu" or "cuda".
        out: Output folder (None: write nothing).
    """

    sentences: tuple[str, ...]
    model: str = "gpt2-tiny"
    methods: tuple[str, ...] = ("span",)
    layers: int | None = None
    lora_rank: int = 0
    local_steps: int = 1
    local_lr: float = 1e-3
    tag_iterations: int = 300
    fallback: bool = True
    seed: int = 0
    device: str = "auto"
    out: str | None = "runs/attack-text"

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS[:2]]
        if unknown:
            raise ConfigError(f"unknown method '{unknown[0]}' for a batch: choose span or tag")
        if not (self.local_lr > 0 and self.local_lr < float("inf")):
            raise ConfigError(f"--local-lr must be a positive number, got {self.local_lr}")
        if self.lora_rank < 0 or self.local_steps < 1 or self.tag_iterations < 1:
            raise ConfigError("--lora-rank must be >= 0, --local-steps and --iterations >= 1")


def load_model(model: str, *, seed: int, layers: int | None) -> LanguageModel:
    if model in BUILTIN:
        return build_language_model(model, seed=seed, layers=layers)
    if layers is not None:
        raise ConfigError("--layers applies to a built-in model only")
    return load_language_model(model)


def run_batch_attack(
    run: BatchAttackRun, *, callback: StepCallback | None = None, lm: LanguageModel | None = None
) -> dict[str, Any]:
    """Simulate the client's step(s), attack with each method, score; write metrics.json."""
    device = resolve_device(run.device)
    use_cpu_threads(device)
    lm = lm or load_model(run.model, seed=run.seed, layers=run.layers)
    batch = encode_batch(lm, list(run.sentences))  # bad sentences fail before any work
    out = prepare_out(run.out) if run.out is not None else None
    lora = LoraSetup(rank=run.lora_rank, seed=run.seed) if run.lora_rank else None
    model = lm.model.to(device)
    lm = LanguageModel(model=model, tokenizer=lm.tokenizer, name=lm.name)
    batch = type(batch)(ids=batch.ids.to(device), mask=batch.mask.to(device))
    start = time.perf_counter()
    observation = observe_batch(lm, batch, lora=lora, local_steps=run.local_steps, lr=run.local_lr)
    client_seconds = time.perf_counter() - start
    truth = batch.sequences()
    eos = int(lm.tokenizer.eos_token_id)
    results: dict[str, Any] = {}
    for method in run.methods:
        if method == "span":
            found = SpanAttack(SpanConfig())(observation, eos=eos)
            row: dict[str, Any] = {
                "rank": found.rank, "width": found.width, "applicable": found.applicable,
                "reason": found.reason, "seconds": round(found.seconds, 3),
                "candidates_per_position": [len(c) for c in found.candidates],
                "search_starts": found.search_starts,
            }  # fmt: skip
            sequences = list(found.sequences)
            if found.applicable and not sequences and lm.kind == "encoder":
                row["applicable"] = False
                row["reason"] = (
                    f"the encoder's combination search found no sequence in "
                    f"{found.search_starts} starts (its budget): per-position candidates only"
                )
            if not row["applicable"] and run.fallback and "tag" not in run.methods:
                row["fallback"] = "tag"
                sequences, row["seconds"] = _tag(lm, observation, batch, run, callback)
        else:
            row = {}
            sequences, row["seconds"] = _tag(lm, observation, batch, run, callback)
        row.update(score(lm, truth, sequences))
        results[method] = row
    summary = {
        "model": lm.name, "family": lm.family, "kind": lm.kind,
        "width": int(lm.model.config.hidden_size),
        "layers": int(lm.model.config.num_hidden_layers),
        "batch_size": len(truth), "max_tokens": max(len(t) for t in truth),
        "lora_rank": run.lora_rank, "local_steps": run.local_steps,
        "client_seconds": round(client_seconds, 3), "peak_rss_mb": peak_rss_mb(),
        "device": str(device), "config": {k: v for k, v in asdict(run).items() if k != "sentences"},
        "methods": results,
    }  # fmt: skip
    if out is not None:
        write_json(out / "metrics.json", summary)
    return summary


def _tag(
    lm: LanguageModel,
    observation: object,
    batch: object,
    run: BatchAttackRun,
    callback: StepCallback | None,
) -> tuple[list[tuple[int, ...]], float]:
    lengths = batch.mask.sum(dim=1).tolist()
    found = TagAttack(TagConfig(iterations=run.tag_iterations))(
        observation, lengths=lengths, bos=int(lm.tokenizer.bos_token_id),
        eos=int(lm.tokenizer.eos_token_id), decoder=lm.kind == "decoder", seed=run.seed,
        callback=callback,
    )  # fmt: skip
    return list(found.sequences), round(found.seconds, 3)


def score(
    lm: LanguageModel, truth: list[tuple[int, ...]], recovered: list[tuple[int, ...]]
) -> dict[str, Any]:
    """Pair each true sequence with a recovered one (optimal assignment), then score."""
    pairs: list[tuple[int, int | None]] = [(i, None) for i in range(len(truth))]
    if recovered:
        gain = np.array([[token_accuracy(t, r) for r in recovered] for t in truth])
        rows, cols = linear_sum_assignment(-gain)
        chosen = dict(zip(rows.tolist(), cols.tolist(), strict=True))
        pairs = [(i, chosen.get(i)) for i in range(len(truth))]
    sentences = []
    for i, j in pairs:
        guess = recovered[j] if j is not None else ()
        original, text = lm.decode(truth[i]).strip(), lm.decode(guess).strip()
        sentences.append({
            "original": original, "recovered": text, "exact": tuple(guess) == tuple(truth[i]),
            "token_accuracy": token_accuracy(truth[i], guess),
            "rouge1": rouge_n(original, text, 1), "rouge2": rouge_n(original, text, 2),
        })  # fmt: skip
    n = len(sentences)
    return {
        "exact": sum(s["exact"] for s in sentences) / n,
        "token_accuracy": sum(s["token_accuracy"] for s in sentences) / n,
        "rouge1": sum(s["rouge1"] for s in sentences) / n,
        "rouge2": sum(s["rouge2"] for s in sentences) / n,
        "recovered_count": len(recovered),
        "sentences": sentences,
    }


def token_accuracy(truth: tuple[int, ...], guess: tuple[int, ...]) -> float:
    """Share of the true sentence's tokens that `guess` holds at the same place.

    The frame (``<s>`` first, ``</s>`` last) is left out: every method is given it.
    """
    inner, other = truth[1:-1], guess[1:-1]
    return sum(a == b for a, b in zip(inner, other, strict=False)) / max(1, len(inner))


def rouge_n(reference: str, candidate: str, n: int) -> float:
    """ROUGE-N F1 over lowercase word n-grams (rouge-score's rule, no stemming)."""

    def grams(text: str) -> Counter:
        words = re.findall(r"[a-z0-9]+", text.lower())
        return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))

    ref, cand = grams(reference), grams(candidate)
    overlap = sum((ref & cand).values())
    if not ref or not cand or not overlap:
        return 0.0
    precision, recall = overlap / sum(cand.values()), overlap / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)
