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
        help="rebuild a client's private sentences from a language model's gradient",
        description="Simulate a client's fine-tuning step on private sentences and recover "
        "them from what it shares. --method dlg (the default for one sentence and no batch "
        "option): DLG on the built-in small BERT, writes OUT/metrics.json and OUT/trace.txt. "
        "--method span: the exact span attack (DAGER) on a decoder or encoder; --method tag: "
        "the TAG-style optimisation baseline; both on a batch (--sentences, --batch-size), "
        "full fine-tuning or LoRA (--lora-rank), one step or several (--local-steps); "
        "writes OUT/metrics.json.",
    )
    text.add_argument("sentence", nargs="?", default=None, help="the private sentence")
    text.add_argument(
        "--model",
        default=None,
        help="a built-in model (gpt2-tiny, gpt2-small, llama-tiny, llama-small, bert-tiny, "
        "bert-base; gpt2-small for span/tag) or a save_pretrained folder (safetensors)",
    )
    text.add_argument(
        "--method", default=None, help="span, tag or dlg; a comma list runs several (span,tag)"
    )
    text.add_argument("--sentences", default=None, help="file with one private sentence a line")
    text.add_argument(
        "--batch-size", type=positive_int, default=None, help="sentences in the client's batch"
    )
    text.add_argument("--lora-rank", type=non_negative_int, default=0, help="LoRA rank (0: full)")
    text.add_argument(
        "--local-steps", type=positive_int, default=1, help="client SGD steps (1: FedSGD)"
    )
    text.add_argument("--local-lr", type=float, default=1e-3, help="their learning rate (1e-3)")
    text.add_argument(
        "--layers", type=positive_int, default=None, help="depth of a built-in model (its own)"
    )
    text.add_argument(
        "--no-fallback",
        action="store_true",
        help="when the span cannot hold the batch, say so and stop (default: run TAG instead)",
    )
    text.add_argument("--mode", default="improved", help="improved (default) or faithful")
    text.add_argument(
        "--iterations",
        type=positive_int,
        default=None,
        help="DLG's L-BFGS (100) or TAG's Adam steps (300)",
    )
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
        "--paper",
        default="dlg",
        choices=("dlg", "dager"),
        help="dlg: DLG's text figure (default); dager: exact rate, ROUGE-1/2 and token "
        "accuracy per model x batch size x method, the span attack beside the TAG baseline",
    )
    figure.add_argument(
        "--mode", default="improved", help="improved (default), faithful, or both (comma list)"
    )
    figure.add_argument(
        "--iterations", type=positive_int, default=None, help="L-BFGS (100) or TAG (200) steps"
    )
    figure.add_argument(
        "--models",
        default="gpt2-small,llama-small,bert-base",
        help="dager: built-in models (comma list)",
    )
    figure.add_argument("--batch-sizes", default="1,4,8,16", help="dager: batch sizes (1,4,8,16)")
    figure.add_argument("--methods", default="span,tag", help="dager: span and/or tag")
    figure.add_argument(
        "--layers", type=positive_int, default=2, help="dager: depth of the built-in models (2)"
    )
    figure.add_argument("--lora-rank", type=non_negative_int, default=0, help="dager: LoRA rank")
    figure.add_argument(
        "--tag-max-batch", type=positive_int, default=1, help="dager: TAG up to this B (1)"
    )
    figure.add_argument("--local-steps", type=positive_int, default=1, help="dager: SGD steps")
    figure.add_argument("--seed", type=non_negative_int, default=0, help="run seed (0)")
    figure.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    figure.add_argument("--out", default="runs/reproduce-text", help="output folder")
    add_sweep_options(figure)
    figure.set_defaults(handler=cmd_reproduce_text)


def cmd_attack_text(args: argparse.Namespace, console: Console) -> None:
    from gradleak.models.text_lm import BUILTIN

    batch = args.sentences is not None or args.batch_size is not None or args.model in BUILTIN
    methods = tuple((args.method or ("span" if batch else "dlg")).split(","))
    if methods != ("dlg",):
        cmd_attack_batch(args, console, methods)
        return
    from gradleak.errors import ConfigError
    from gradleak.experiments.text.attack import DEFAULT_SENTENCE, TextAttackRun, run_attack_text

    if batch or args.lora_rank or args.local_steps > 1 or args.layers is not None:
        raise ConfigError(
            "--method dlg attacks one sentence on a masked LM (DLG's setting); use --method "
            "span or tag for a batch, LoRA, local steps or a built-in decoder"
        )

    run = TextAttackRun(
        sentence=DEFAULT_SENTENCE if args.sentence is None else args.sentence,
        model=args.model,
        mode=args.mode,
        iterations=args.iterations or 100,
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


def cmd_attack_batch(args: argparse.Namespace, console: Console, methods: tuple[str, ...]) -> None:
    from gradleak.errors import ConfigError
    from gradleak.experiments.text.batch import BatchAttackRun, read_sentences, run_batch_attack
    from gradleak.models.text_lm import BUILTIN

    if "dlg" in methods:
        raise ConfigError("--method dlg runs alone (one sentence on a masked LM)")
    if args.sentence is not None and args.sentences is not None:
        raise ConfigError("give the sentence or --sentences FILE, not both")
    sentences = (
        [args.sentence] if args.sentence is not None
        else read_sentences(args.sentences, args.batch_size or (None if args.sentences else 16))
    )  # fmt: skip
    run = BatchAttackRun(
        sentences=tuple(sentences),
        model=args.model or "gpt2-small",
        methods=methods,
        layers=args.layers,
        lora_rank=args.lora_rank,
        local_steps=args.local_steps,
        local_lr=args.local_lr,
        tag_iterations=args.iterations or 300,
        fallback=not args.no_fallback,
        seed=args.seed,
        device=args.device,
        out=args.out,
    )
    if run.model not in BUILTIN:  # transformers' loading bars would mix with ours
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    # The span attack is a few seconds without steps; TAG's Adam steps get a bar.
    progress = loss_bar(console)
    task = progress.add_task("TAG baseline", total=run.tag_iterations, loss="")

    def on_step(step: int, loss: float) -> None:
        if not progress.live.is_started:
            progress.start()
        progress.update(task, completed=step, loss=f"{loss:.2e}")

    try:
        with console.status(f"client step and attack on {len(sentences)} sentences"):
            summary = run_batch_attack(run, callback=on_step)
    finally:
        if progress.live.is_started:
            progress.stop()
    for method, row in summary["methods"].items():
        table = Table(title=f"gradleak attack-text --method {method}", show_header=True)
        table.add_column("#", justify="right")
        table.add_column("exact")
        table.add_column("recovered")
        for number, sentence in enumerate(row["sentences"], start=1):
            mark = "yes" if sentence["exact"] else f"{sentence['token_accuracy']:.2f}"
            table.add_row(str(number), mark, sentence["recovered"] or "-")
        console.print(table)
        if row.get("applicable") is False:
            console.print(f"span attack not applicable: {row['reason']}")
            if row.get("fallback"):
                console.print("fell back to the TAG baseline")
        console.print(
            f"{method}: {100 * row['exact']:.0f}% of {summary['batch_size']} sentences exact, "
            f"token accuracy {row['token_accuracy']:.3f}, ROUGE-1 {100 * row['rouge1']:.1f}, "
            f"ROUGE-2 {100 * row['rouge2']:.1f}, {row['seconds']:.1f} s"
        )
    console.print(
        f"{summary['model']} (width {summary['width']}, {summary['layers']} layers), "
        f"client step {summary['client_seconds']:.1f} s, peak memory "
        f"{summary['peak_rss_mb']:.0f} MB; wrote {run.out}/metrics.json"
    )


def cmd_reproduce_text(args: argparse.Namespace, console: Console) -> None:
    if args.paper == "dager":
        cmd_reproduce_dager(args, console)
        return
    from gradleak.experiments.text.reproduce import TextReproduceRun, run_reproduce_text

    modes = ("improved", "faithful") if args.mode == "both" else tuple(args.mode.split(","))
    run = TextReproduceRun(
        modes=modes,
        iterations=args.iterations or 100,
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


def cmd_reproduce_dager(args: argparse.Namespace, console: Console) -> None:
    from gradleak.errors import ConfigError
    from gradleak.experiments.text.dager import DagerTableRun, run_dager_table

    try:
        sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise ConfigError(f"--batch-sizes takes whole numbers, got '{args.batch_sizes}'") from None
    out = args.out if args.out != "runs/reproduce-text" else "runs/reproduce-text-dager"
    run = DagerTableRun(
        models=tuple(args.models.split(",")),
        batch_sizes=sizes,
        methods=tuple(args.methods.split(",")),
        layers=args.layers,
        lora_rank=args.lora_rank,
        local_steps=args.local_steps,
        tag_iterations=args.iterations or 200,
        tag_max_batch=args.tag_max_batch,
        seed=args.seed,
        device=args.device,
        out=out,
        command=shlex.join(["gradleak", *args.argv]),
        workers=args.workers or 1,
        ray=args.ray,
    )
    with StageBars(console, "cells", lambda stage: "model x batch size") as bars:
        summary = run_dager_table(run, callback=bars)
    for row in summary["rows"]:
        console.print(
            f"{row['model']} B={row['batch_size']} {row['method']}: "
            f"{100 * row['exact']:.0f}% exact, ROUGE-1 {100 * row['rouge1']:.1f}, "
            f"ROUGE-2 {100 * row['rouge2']:.1f}, {row['seconds']:.1f} s"
        )
    console.print(f"wrote {run.out}/report.md, summary.json and results.jsonl")
