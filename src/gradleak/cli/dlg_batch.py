"""The console side of `gradleak reproduce dlg-batch`: options -> run, progress bar, table."""

from __future__ import annotations

import argparse
import shlex

from rich.console import Console
from rich.table import Table

from gradleak.errors import ConfigError
from gradleak.experiments.dlg_batch.run import BatchRun, parse_batch_sizes, run_reproduce_batch
from gradleak.progress_bars import StageBars


def cmd_reproduce_batch(args: argparse.Namespace, console: Console) -> None:
    """Run `gradleak reproduce dlg-batch` from the `reproduce` subcommand's options.

    Raises:
        ConfigError: Bad or idlg-only options (before anything is written).
    """
    if args.all_datasets:
        raise ConfigError("--all-datasets is for 'reproduce idlg'; use --dataset with dlg-batch")
    if args.engine != "batched" or args.mode != "faithful":
        raise ConfigError(
            "--engine and --mode are for 'reproduce idlg'; dlg-batch uses the batched engine "
            "and runs the methods named by --methods"
        )
    run = BatchRun(
        batch_sizes=parse_batch_sizes(args.batch_sizes),
        experiments=args.experiments or 100,
        dataset=args.dataset or "cifar100",
        model=args.model,
        data_dir=args.data_dir,
        methods=tuple(m.strip() for m in args.methods.split(",")),
        iterations=args.iterations,
        seed=args.seed,
        out=args.out or "runs/reproduce-dlg-batch",
        chunk=args.chunk or 16,
        device=args.device,
        command=shlex.join(["gradleak", *args.argv]),
        workers=args.workers,
        ray=args.ray,
    )
    with StageBars(console, "experiments", lambda size: f"dlg-batch B={size}") as bars:
        summary = run_reproduce_batch(run, callback=bars)
    console.print(_table(summary))
    console.print(
        f"wrote {run.out}/results.jsonl, summary.json, iterations.png, strip.png and report.md "
        f"({summary['wall_seconds']:.0f} s)"
    )


def _table(summary: dict) -> Table:
    table = Table(title="batches recovered (MSE < 1e-3 each, labels exact); DLG Table 2 beside")
    for column in ("B", "method", "recovered", "iterations (median)", "evaluations", "paper"):
        table.add_column(column)
    for size in summary["batch_sizes"]:
        entry = summary["batch"][str(size)]
        for method, s in entry["methods"].items():
            share = s["recovered_share"]
            its, evs = s["iterations_recovered"]["median"], s["evaluations_recovered"]["median"]
            table.add_row(
                str(size),
                method,
                "n/a"
                if share is None
                else f"{100 * share:.0f}% ({s['recovered']}/{s['experiments']})",
                "n/a" if its is None else f"{its:.0f}",
                "n/a" if evs is None else f"{evs:.0f}",
                str(entry["paper_iterations"] or "n/a"),
            )
    return table
