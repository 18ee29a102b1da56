"""`gradleak reproduce-text`: DLG's text figure, regenerated on the built-in BERT.

The paper shows, for a few sentences taken from the NeurIPS web pages, the
dummy decoded to tokens at several iterations beside the original.  This
experiment attacks a few sentences of the same kind (our own, written in the
package's vocabulary) and writes the same kind of figure as text, with the
paper's description beside it, to ``OUT/report.md``; also ``summary.json``,
``results.jsonl`` (one line per sentence and mode, so a rerun resumes) and
one trace per sentence and mode.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gradleak.attacks.text import MODES, TextAttackConfig
from gradleak.errors import ConfigError
from gradleak.experiments.common import derive_seeds, resolve_device, write_json
from gradleak.experiments.text.attack import attack_sentence, format_trace
from gradleak.models.text import build_text_model
from gradleak.outdir import prepare_out
from gradleak.sweep.executors import make_executor
from gradleak.sweep.runner import Emit, Group, run_sweep
from gradleak.sweep.store import RESULTS, FolderLock, ResultsStore, pin_run

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
    """One `gradleak reproduce-text` invocation.

    Attributes:
        modes: "improved" (gradleak's) and/or "faithful" (DLG's recipe).
        sentences: The private sentences, one client step each.
        iterations: L-BFGS steps per attack.
        seed: Fixes the model init and every dummy.
        device: "auto", "cpu" or "cuda".
        out: Output folder; a rerun of the same command resumes there.
        command: The command line, quoted in the report.
        workers: Worker processes (None: one per CPU core; 1: this process).
        ray: Run the attacks as Ray tasks: "local", "auto" or "HOST:PORT".
    """

    modes: tuple[str, ...] = ("improved",)
    sentences: tuple[str, ...] = SENTENCES
    iterations: int = 100
    seed: int = 0
    device: str = "auto"
    out: str = "runs/reproduce-text"
    command: str = "gradleak reproduce-text"
    workers: int | None = None
    ray: str | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise ConfigError(
                f"unknown mode '{','.join(unknown)}': choose {', '.join(MODES)} or both"
            )
        if self.seed < 0:
            raise ConfigError(f"--seed must be 0 or more, got {self.seed}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers must be 1 or more, got {self.workers}")


def run_reproduce_text(
    run: TextReproduceRun, *, callback: ProgressCallback | None = None
) -> dict[str, Any]:
    """Attack every sentence in every mode; write traces, summary.json and report.md.

    Every attack is a work item of the sweep runner (results.jsonl, resumable).

    Args:
        run: What to run.
        callback: Called as ``callback("sentences", attacks_done, attacks_total)``.

    Returns:
        The summary written to ``<out>/summary.json``.
    """
    device = resolve_device(run.device)
    out = prepare_out(run.out)
    start = time.perf_counter()
    with FolderLock(out), make_executor(run.workers, run.ray) as executor:
        pin_run(out, _pinned(run))
        store = ResultsStore(out / RESULTS, key=_row_key)
        groups = [
            Group(((mode, index),), (mode, index))
            for mode in run.modes
            for index in range(len(run.sentences))
        ]

        def progress(done: int, total: int) -> None:
            if callback is not None:
                callback("sentences", done, total)

        run_sweep(store, groups, attack_group, run, executor, progress=progress)
    wanted = {(m, i) for m in run.modes for i in range(len(run.sentences))}
    rows = sorted(
        (r for r in store.rows if _row_key(r) in wanted),
        key=lambda r: (run.modes.index(r["mode"]), r["index"]),
    )
    figures = [(out / _figure_name(r["mode"], r["index"])).read_text() for r in rows]
    summary = {
        "command": run.command,
        "seconds": round(time.perf_counter() - start, 1),
        "device": str(device),
        "executor": executor.name,
        "modes": {mode: _summarise([r for r in rows if r["mode"] == mode]) for mode in run.modes},
        "rows": rows,
    }
    write_json(out / "summary.json", summary)
    (out / "report.md").write_text(_report(summary, figures))
    log.info("wrote %s", out)
    return summary


def _row_key(row: dict[str, Any]) -> tuple[str, int]:
    return str(row["mode"]), int(row["index"])


def _figure_name(mode: str, index: int) -> str:
    return f"figure-{mode}-{index}.md"


def _pinned(run: TextReproduceRun) -> dict[str, Any]:
    return {
        "paper": "dlg-text",
        "dataset": "sentences",
        "mode": f"iterations={run.iterations}",
        "seed": run.seed,
        "model": "builtin-bert",
        "dataset_size": len(run.sentences),
        "sentences": list(run.sentences),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": run.command,
    }


@functools.lru_cache(maxsize=2)
def _text_model(seed: int) -> Any:
    """Each worker process builds the model once."""
    model_seed, _ = derive_seeds(seed, 2)
    return build_text_model(seed=model_seed)


def attack_group(run: TextReproduceRun, spec: tuple[str, int], emit: Emit) -> None:
    """The sweep task: one sentence, one mode; its trace and figure travel with the row."""
    mode, index = spec
    _, attack_seed = derive_seeds(run.seed, 2)
    text_model = _text_model(run.seed)
    config = TextAttackConfig(mode=mode, iterations=run.iterations)
    row, result = attack_sentence(
        text_model,
        run.sentences[index],
        config,
        seed=attack_seed,
        device=resolve_device(run.device),
    )
    trace = format_trace(text_model, result, row)
    picked = [(s, ids) for s, ids in result.trace if s in (0, 10, 20, 30, result.steps)]
    figure = (
        f"**{mode}, sentence {index}** (token accuracy {row['token_accuracy']:.2f})\n\n"
        "| iteration | decoded dummy |\n|---|---|\n"
        + "".join(f"| {s} | {text_model.decode(ids[1:-1])} |\n" for s, ids in picked)
        + f"| original | {row['original']} |\n"
    )
    files = {
        f"trace-{mode}-{index}.txt": trace.encode(),
        _figure_name(mode, index): figure.encode(),
    }
    emit({"index": index, **row}, files)


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
