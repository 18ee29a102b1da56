"""`gradleak attack-text` and `gradleak reproduce-text`."""

from __future__ import annotations

import argparse
import shlex

from rich.console import Console
from rich.table import Table

from gradleak.cli.common import (
    add_sweep_options,
    finish_loss_bar,
    loss_bar,
    non_negative_int,
    positive_int,
)
from gradleak.progress_bars import StageBars


def add(commands: argparse._SubParsersAction) -> None:
    text = commands.add_parser(
        "attack-text",
        help="rebuild a private sentence from a masked language model's gradient",
        description="Simulate one masked-language-model step on a sentence and recover it "
        "token by token from the shared gradient (DLG on text). Writes OUT/metrics.json and "
        "OUT/trace.txt (the decoded dummy after each step, like DLG's text figure).",
    )
    text.add_argument("sentence", nargs="?", default=None, help="the private sentence")
    text.add_argument(
        "--model", default=None, help="folder of a saved masked LM and tokenizer (built-in BERT)"
    )
    text.add_argument("--mode", default="improved", help="improved (default) or faithful")
    text.add_argument("--iterations", type=positive_int, default=100, help="L-BFGS steps (100)")
    text.add_argument("--trace-every", type=positive_int, default=1, help="trace every N steps (1)")
    text.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of model and dummy init (0)"
    )
    text.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    text.add_argument("--out", default="runs/attack-text", help="output folder")
    text.set_defaults(handler=cmd_attack_text)

    figure = commands.add_parser(
        "reproduce-text",
        help="regenerate DLG's text figure on the built-in BERT",
        description="Attack three conference-page sentences and write OUT/report.md (our "
        "decoded dummies beside the paper's figure), summary.json and one trace per sentence.",
    )
    figure.add_argument(
        "--mode", default="improved", help="improved (default), faithful, or both (comma list)"
    )
    figure.add_argument("--iterations", type=positive_int, default=100, help="L-BFGS steps")
    figure.add_argument("--seed", type=non_negative_int, default=0, help="run seed (0)")
    figure.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    figure.add_argument("--out", default="runs/reproduce-text", help="output folder")
    add_sweep_options(figure)
    figure.set_defaults(handler=cmd_reproduce_text)


def cmd_attack_text(args: argparse.Namespace, console: Console) -> None:
    from gradleak.experiments.text.attack import DEFAULT_SENTENCE, TextAttackRun, run_attack_text

    run = TextAttackRun(
        sentence=DEFAULT_SENTENCE if args.sentence is None else args.sentence,
        model=args.model,
        mode=args.mode,
        iterations=args.iterations,
        trace_every=args.trace_every,
        seed=args.seed,
        device=args.device,
        out=args.out,
    )
    if run.model is not None:  # transformers' own loading bars would mix with ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    progress = loss_bar(console)
    task = progress.add_task(f"text {run.mode} attack", total=run.iterations, loss="")

    def on_step(step: int, loss: float) -> None:
        if not progress.live.is_started:  # bad input fails before any step
            progress.start()
        progress.update(task, completed=min(step, run.iterations), loss=f"{loss:.2e}")

    try:
        row = run_attack_text(run, callback=on_step)
        finish_loss_bar(progress, task, row["iterations"], row["matching_loss"])
    finally:
        if progress.live.is_started:
            progress.stop()
    table = Table(title="gradleak attack-text", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("original", row["original"])
    table.add_row("recovered", row["recovered"])
    exact = "  exact" if row["exact"] else ""
    table.add_row("token accuracy", f"{row['token_accuracy']:.2f}{exact}")
    table.add_row("tokens leaked", f"{row['leaked_tokens']} ({row['leak']})")
    table.add_row("steps / evaluations", f"{row['iterations']} / {row['evaluations']}")
    table.add_row("time", f"{row['seconds']:.1f} s on {row['device']}")
    console.print(table)
    console.print(f"wrote {run.out}/metrics.json and {run.out}/trace.txt")


def cmd_reproduce_text(args: argparse.Namespace, console: Console) -> None:
    from gradleak.experiments.text.reproduce import TextReproduceRun, run_reproduce_text

    modes = ("improved", "faithful") if args.mode == "both" else tuple(args.mode.split(","))
    run = TextReproduceRun(
        modes=modes,
        iterations=args.iterations,
        seed=args.seed,
        device=args.device,
        out=args.out,
        command=shlex.join(["gradleak", *args.argv]),
        workers=args.workers,
        ray=args.ray,
    )
    with StageBars(console, "sentences", lambda stage: "DLG text attacks") as bars:
        summary = run_reproduce_text(run, callback=bars)
    for mode, stats in summary["modes"].items():
        console.print(
            f"{mode}: mean token accuracy {stats['token_accuracy']:.2f}, "
            f"{100 * stats['exact']:.0f}% of sentences exact, {stats['seconds']} s"
        )
    console.print(f"wrote {run.out}/report.md, summary.json and the traces")
