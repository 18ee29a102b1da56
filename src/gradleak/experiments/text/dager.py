"""`gradleak reproduce-text --paper dager`: a table in the manner of DAGER's.

Per model x batch size x method (the span attack, the TAG-style baseline):
share of sentences recovered exactly, ROUGE-1/2 F1 and token accuracy, on the
first B of the package's sentences (written for gradleak).  One group of the
sweep runner per model and batch size (one client step, every method on it),
so a rerun of the same command resumes where it stopped (results.jsonl).
Writes OUT/report.md, summary.json and results.jsonl.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gradleak.errors import ConfigError
from gradleak.experiments.common import resolve_device, write_json
from gradleak.experiments.text.batch import (
    BatchAttackRun,
    load_model,
    run_batch_attack,
    shipped_sentences,
)
from gradleak.models.text_lm import BUILTIN, LanguageModel
from gradleak.outdir import prepare_out
from gradleak.sweep.executors import make_executor
from gradleak.sweep.runner import Emit, Group, run_sweep
from gradleak.sweep.store import RESULTS, FolderLock, ResultsStore, pin_run

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]

PAPER = (
    "DAGER (Petrov et al., NeurIPS 2024) recovers whole batches exactly from the gradients of "
    "decoders and encoders (GPT-2, LLaMA-class, BERT), batches up to 128 sequences, ROUGE-1/2 "
    "above 0.99 in the settings it reports, LoRA included; the optimisation baselines (TAG, "
    "LAMP) recover parts of sentences at small batches. Its published runs use trained "
    "checkpoints and public datasets on a GPU; ours use seeded random weights, our own "
    "sentences and a CPU, so only the shape of the comparison carries over."
)


@dataclass(frozen=True)
class DagerTableRun:
    """One `gradleak reproduce-text --paper dager` invocation.

    Attributes:
        models: Built-in model names.
        batch_sizes: Client batch sizes (the first B shipped sentences).
        methods: "span" and/or "tag".
        layers: Depth of the built-in models (None: their own; both attacks
            read the first layers, TAG pays for every one).
        lora_rank: LoRA rank on the attention projections (0: full fine-tuning).
        local_steps: Client SGD steps (1: FedSGD).
        tag_iterations: The TAG baseline's Adam steps.
        tag_max_batch: TAG runs at batch sizes up to this only (its cost grows with
            B x length x vocabulary, minutes per cell on a CPU at width 768).
        seed: Seed of models, adapters and TAG's start.
        device: "auto", "cpu" or "cuda".
        out: Output folder; a rerun of the same command resumes there.
        command: The command line, quoted in the report.
        workers: Worker processes (None: one per core; 1: this process).
        ray: Run the groups as Ray tasks.
    """

    models: tuple[str, ...] = ("gpt2-small", "llama-small", "bert-base")
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16)
    methods: tuple[str, ...] = ("span", "tag")
    layers: int | None = 2
    lora_rank: int = 0
    local_steps: int = 1
    tag_iterations: int = 200
    tag_max_batch: int = 1
    seed: int = 0
    device: str = "auto"
    out: str = "runs/reproduce-text-dager"
    command: str = "gradleak reproduce-text --paper dager"
    workers: int | None = 1
    ray: str | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in BUILTIN]
        if unknown:
            raise ConfigError(f"unknown model '{unknown[0]}': choose among {', '.join(BUILTIN)}")
        bad = [m for m in self.methods if m not in ("span", "tag")]
        if bad or not self.methods:
            raise ConfigError(f"unknown method '{','.join(bad)}': choose span and/or tag")
        count = len(shipped_sentences())
        if not self.batch_sizes or min(self.batch_sizes) < 1 or max(self.batch_sizes) > count:
            raise ConfigError(f"batch sizes must lie between 1 and {count} (the shipped set)")


@functools.lru_cache(maxsize=2)
def _model(name: str, seed: int, layers: int | None) -> LanguageModel:
    """Each worker process builds a model once."""
    return load_model(name, seed=seed, layers=layers)


def table_group(run: DagerTableRun, spec: tuple[str, int], emit: Emit) -> None:
    """The sweep task: one model, one batch size, one client step, every method."""
    name, size = spec
    lm = _model(name, run.seed, run.layers)
    attack = BatchAttackRun(
        sentences=tuple(shipped_sentences()[:size]), model=name, methods=_methods(run, size),
        layers=run.layers, lora_rank=run.lora_rank, local_steps=run.local_steps,
        tag_iterations=run.tag_iterations, fallback=False, seed=run.seed, device=run.device,
        out=None,
    )  # fmt: skip
    summary = run_batch_attack(attack, lm=lm)
    for method, row in summary["methods"].items():
        emit(
            {
                "model": name,
                "batch_size": size,
                "method": method,
                "width": summary["width"],
                "layers": summary["layers"],
                "max_tokens": summary["max_tokens"],
                "client_seconds": summary["client_seconds"],
                "peak_rss_mb": summary["peak_rss_mb"],
                **{k: v for k, v in row.items() if k != "sentences"},
                "sentences": row["sentences"],
            },  # fmt: skip
            None,
        )


def _methods(run: DagerTableRun, size: int) -> tuple[str, ...]:
    return tuple(m for m in run.methods if m != "tag" or size <= run.tag_max_batch)


def _key(row: dict[str, Any]) -> tuple[str, int, str]:
    return str(row["model"]), int(row["batch_size"]), str(row["method"])


def run_dager_table(
    run: DagerTableRun, *, callback: ProgressCallback | None = None
) -> dict[str, Any]:
    """Run (or resume) the table; write summary.json and report.md."""
    device = resolve_device(run.device)
    out = prepare_out(run.out)
    start = time.perf_counter()
    with FolderLock(out), make_executor(run.workers, run.ray) as executor:
        pin_run(
            out,
            {
                "paper": "dager",
                "dataset": "sentences",
                "mode": f"layers={run.layers},lora={run.lora_rank},steps={run.local_steps},"
                f"tag={run.tag_iterations}x{run.tag_max_batch}",
                "seed": run.seed,
                "model": ",".join(run.models),
                "dataset_size": max(run.batch_sizes),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": run.command,
            },  # fmt: skip
        )
        store = ResultsStore(out / RESULTS, key=_key)
        groups = [
            Group(tuple((m, b, method) for method in _methods(run, b)), (m, b))
            for m in run.models
            for b in run.batch_sizes
        ]

        def progress(done: int, total: int) -> None:
            if callback is not None:
                callback("cells", done, total)

        run_sweep(store, groups, table_group, run, executor, progress=progress)
    wanted = {(m, b, x) for m in run.models for b in run.batch_sizes for x in _methods(run, b)}

    def place(row: dict[str, Any]) -> tuple[int, int, int]:
        model, size, method = _key(row)
        return run.models.index(model), run.batch_sizes.index(size), run.methods.index(method)

    rows = sorted((r for r in store.rows if _key(r) in wanted), key=place)
    summary = {
        "command": run.command,
        "seconds": round(time.perf_counter() - start, 1),
        "device": str(device),
        "rows": rows,
    }
    write_json(out / "summary.json", summary)
    (out / "report.md").write_text(report(summary, run))
    return summary


def report(summary: dict[str, Any], run: DagerTableRun) -> str:
    setting = "full fine-tuning" if not run.lora_rank else f"LoRA rank {run.lora_rank}"
    steps = "FedSGD" if run.local_steps == 1 else f"{run.local_steps} local steps"
    lines = [
        "# Exact text from transformers' gradients (a table in the manner of DAGER's)",
        "",
        f"Command: `{summary['command']}` ({summary['seconds']} s on {summary['device']}).",
        f"Client: {setting}, {steps}, on the first B of gradleak's 64 sentences; seeded "
        "random weights; the span attack (DAGER-class) and the TAG-style baseline "
        f"({run.tag_iterations} Adam steps, at B <= {run.tag_max_batch} only) on the same "
        "observation.",
        "",
        "| model | width x layers | B | method | exact | ROUGE-1 | ROUGE-2 | token acc. | "
        "attack s | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        note = "" if r.get("applicable", True) else r.get("reason", "")[:90]
        lines.append(
            f"| {r['model']} | {r['width']} x {r['layers']} | {r['batch_size']} | {r['method']} | "
            f"{100 * r['exact']:.0f}% | {100 * r['rouge1']:.1f} | {100 * r['rouge2']:.1f} | "
            f"{r['token_accuracy']:.3f} | {r['seconds']:.1f} | {note} |"
        )
    lines += ["", "## DAGER's published figures (in our words)", "", PAPER, ""]
    return "\n".join(lines)
