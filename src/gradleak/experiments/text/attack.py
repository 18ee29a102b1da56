"""`gradleak attack-text`: one sentence, one masked-LM step, one recovered sentence."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gradleak.attacks.text import StepCallback, TextAttackConfig, TextDLG, TextReconstruction
from gradleak.errors import ConfigError
from gradleak.experiments.common import (
    derive_seeds,
    finite_or_none,
    resolve_device,
    use_cpu_threads,
    write_json,
)
from gradleak.models.text import (
    TextModel,
    build_text_model,
    check_sentence,
    encode,
    load_text_model,
    observe_mlm,
)
from gradleak.outdir import prepare_out

log = logging.getLogger(__name__)

DEFAULT_SENTENCE = "federated learning keeps the data on the device, but the gradient can leak it."


@dataclass(frozen=True)
class TextAttackRun:
    """One `gradleak attack-text` invocation.

    Attributes:
        sentence: The client's private sentence.
        model: Folder of a saved masked LM and tokenizer, or None for the built-in BERT.
        mode: "improved" or "faithful" (see `gradleak.attacks.text`).
        iterations: L-BFGS steps.
        trace_every: Decode the dummy every this many steps for trace.txt.
        seed: Fixes the built-in model's init and the dummy init.
        device: "auto", "cpu" or "cuda".
        out: Folder for metrics.json and trace.txt.
    """

    sentence: str = DEFAULT_SENTENCE
    model: str | None = None
    mode: str = "improved"
    iterations: int = 100
    trace_every: int = 1
    seed: int = 0
    device: str = "auto"
    out: str = "runs/attack-text"

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"--seed must be 0 or more, got {self.seed}")


def run_attack_text(run: TextAttackRun, *, callback: StepCallback | None = None) -> dict[str, Any]:
    """Simulate the client's step on the sentence, attack it, write metrics.json and trace.txt.

    Returns:
        The metrics written to ``<out>/metrics.json``.
    """
    check_sentence(run.sentence)
    config = TextAttackConfig(mode=run.mode, iterations=run.iterations, trace_every=run.trace_every)
    device = resolve_device(run.device)
    use_cpu_threads(device)
    model_seed, attack_seed = derive_seeds(run.seed, 2)
    text_model = (
        build_text_model(seed=model_seed) if run.model is None else load_text_model(run.model)
    )
    ids = encode(text_model, run.sentence)  # a sentence the model cannot take fails first
    out = prepare_out(run.out)  # before the attack: a bad --out must not lose it
    row, result = attack_sentence(
        text_model,
        run.sentence,
        config,
        seed=attack_seed,
        device=device,
        callback=callback,
        ids=ids,
    )
    row.update(seed=run.seed, device=str(device), config=asdict(config))
    write_json(out / "metrics.json", row)
    (out / "trace.txt").write_text(format_trace(text_model, result, row))
    log.info("wrote %s", out)
    return row


def attack_sentence(
    text_model: TextModel,
    sentence: str,
    config: TextAttackConfig,
    *,
    seed: int,
    device: object = "cpu",
    callback: StepCallback | None = None,
    ids: torch.Tensor | None = None,
) -> tuple[dict[str, Any], TextReconstruction]:
    """Encode, observe the client's step, attack; return the metrics row and the result.

    `ids` is the sentence already encoded, if the caller has it.
    """
    ids = encode(text_model, sentence) if ids is None else ids
    model = text_model.model.to(device)
    observation = observe_mlm(model, ids.to(device))
    start = time.perf_counter()
    result = TextDLG(config)(observation, frame=text_model.frame, seed=seed, callback=callback)
    seconds = time.perf_counter() - start

    truth, recovered = ids[1:-1].tolist(), result.token_ids[1:-1].tolist()
    correct = sum(t == r for t, r in zip(truth, recovered, strict=True))
    present = set(truth)
    row = {
        "mode": config.mode,
        "model": text_model.name,
        "sentence": sentence,
        "original": text_model.decode(truth),
        "recovered": text_model.decode(recovered),
        "tokens": text_model.tokenizer.convert_ids_to_tokens(truth),
        "recovered_tokens": text_model.tokenizer.convert_ids_to_tokens(recovered),
        "token_accuracy": correct / len(truth),
        "exact": correct == len(truth),
        "length": len(ids),
        "leak": result.leak,
        "leaked_tokens": len(result.candidates),
        "leaked_tokens_in_sentence": sum(c in present for c in result.candidates),
        "matching_loss": finite_or_none(result.matching_loss),
        "converged": result.converged,
        "iterations": result.steps,
        "evaluations": result.evaluations,
        "restarts": result.restarts,
        "seconds": round(seconds, 3),
    }
    return row, result


def format_trace(text_model: TextModel, result: TextReconstruction, row: dict[str, Any]) -> str:
    """trace.txt: the decoded dummy at each traced step, then the original (DLG's Figure 3)."""
    lines = [
        f"# gradleak attack-text: DLG on a masked language model ({row['mode']} mode, "
        f"{row['model']})",
        f"# the dummy decoded to its nearest tokens after each traced L-BFGS step; "
        f"token accuracy {row['token_accuracy']:.2f}",
    ]
    lines += [f"iter {step:3d} | {text_model.decode(ids[1:-1])}" for step, ids in result.trace]
    lines.append(f"original | {row['original']}")
    return "\n".join(lines) + "\n"
