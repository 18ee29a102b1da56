"""`gradleak reproduce-text`: DLG's text figure, regenerated on the built-in BERT.

The paper shows, for a few sentences taken from the NeurIPS web pages, the
dummy decoded to tokens at several iterations beside the original.  This
experiment attacks a few sentences of the same kind (our own, written in the
package's vocabulary) and writes the same kind of figure as text, with the
paper's description beside it, to ``OUT/report.md``; also ``summary.json``
and one trace per sentence and mode.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradleak.attacks.text import MODES, TextAttackConfig
from gradleak.errors import ConfigError
from gradleak.experiments.common import derive_seeds, resolve_device, use_cpu_threads, write_json
from gradleak.experiments.text.attack import attack_sentence, format_trace
from gradleak.models.text import build_text_model

log = logging.getLogger(__name__)

SENTENCES = (
    "the conference will be held in december, and registration is open to all.",
    "authors of accepted papers will present a poster at the workshop.",
    "please submit your paper before the deadline and read the review process.",
)

PAPER_FIGURE = (
    "DLG (Zhu et al., NeurIPS 2019) attacks BERT trained with a masked-language-model "
    "objective. It optimises dummy token embeddings with L-BFGS (100 iterations for text) "
    "and maps each position to its nearest vocabulary token. Its figure shows, for "
    "sentences from the NeurIPS web pages, the decoded dummy at a few iterations beside "
    "the original: unrelated word pieces at the start, more and more correct tokens as "
    "the iterations go on, and at the end a sentence that matches the original token for "
    "token except for a few tokens."
)

ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TextReproduceRun:
    """One `gradleak reproduce-text` invocation."""

    modes: tuple[str, ...] = ("improved",)
    sentences: tuple[str, ...] = SENTENCES
    iterations: int = 100
    seed: int = 0
    device: str = "auto"
    out: str = "runs/reproduce-text"
    command: str = "gradleak reproduce-text"

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise ConfigError(
                f"unknown mode '{','.join(unknown)}': choose {', '.join(MODES)} or both"
            )


def run_reproduce_text(
    run: TextReproduceRun, *, callback: ProgressCallback | None = None
) -> dict[str, Any]:
    """Attack every sentence in every mode; write traces, summary.json and report.md.

    Args:
        run: What to run.
        callback: Called as ``callback(mode, sentences_done, sentences_total)``.

    Returns:
        The summary written to ``<out>/summary.json``.
    """
    device = resolve_device(run.device)
    use_cpu_threads(device)
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    model_seed, attack_seed = derive_seeds(run.seed, 2)
    text_model = build_text_model(seed=model_seed)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    figures: list[str] = []
    for mode in run.modes:
        config = TextAttackConfig(mode=mode, iterations=run.iterations)
        for index, sentence in enumerate(run.sentences):
            row, result = attack_sentence(
                text_model, sentence, config, seed=attack_seed, device=device
            )
            trace = format_trace(text_model, result, row)
            (out / f"trace-{mode}-{index}.txt").write_text(trace)
            rows.append({"index": index, **row})
            picked = [(s, ids) for s, ids in result.trace if s in (0, 10, 20, 30, result.steps)]
            figures.append(
                f"**{mode}, sentence {index}** (token accuracy {row['token_accuracy']:.2f})\n\n"
                "| iteration | decoded dummy |\n|---|---|\n"
                + "".join(f"| {s} | {text_model.decode(ids[1:-1])} |\n" for s, ids in picked)
                + f"| original | {row['original']} |\n"
            )
            if callback is not None:
                callback(mode, index + 1, len(run.sentences))
    seconds = time.perf_counter() - start
    summary = {
        "command": run.command,
        "seconds": round(seconds, 1),
        "device": str(device),
        "modes": {mode: _summarise([r for r in rows if r["mode"] == mode]) for mode in run.modes},
        "rows": rows,
    }
    write_json(out / "summary.json", summary)
    (out / "report.md").write_text(_report(summary, figures))
    log.info("wrote %s", out)
    return summary


def _summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "sentences": len(rows),
        "token_accuracy": sum(r["token_accuracy"] for r in rows) / len(rows),
        "exact": sum(r["exact"] for r in rows) / len(rows),
        "iterations": [r["iterations"] for r in rows],
        "seconds": round(sum(r["seconds"] for r in rows), 1),
    }


def _report(summary: dict[str, Any], figures: list[str]) -> str:
    lines = [
        "# DLG's text figure, regenerated",
        "",
        f"Command: `{summary['command']}` ({summary['seconds']} s on {summary['device']}).",
        "Victim: the built-in BERT (2 layers, hidden size 32, seeded random init), one "
        "sentence per client step, every word position predicting its own token.",
        "",
        "## The paper's figure (in our words)",
        "",
        PAPER_FIGURE,
        "",
        "## Ours",
        "",
        "| mode | sentences | mean token accuracy | exact sentences | L-BFGS steps | time |",
        "|---|---|---|---|---|---|",
    ]
    for mode, stats in summary["modes"].items():
        lines.append(
            f"| {mode} | {stats['sentences']} | {stats['token_accuracy']:.2f} | "
            f"{100 * stats['exact']:.0f}% | {stats['iterations']} | {stats['seconds']} s |"
        )
    lines += ["", "Iterations 0, 10, 20, 30 and the last one, as in the paper's figure:", ""]
    return "\n".join(lines) + "\n" + "\n".join(figures)
