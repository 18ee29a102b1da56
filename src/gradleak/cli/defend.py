"""`gradleak defend`: attack success and model accuracy per defense and strength."""

from __future__ import annotations

import argparse
import shlex

from rich.console import Console
from rich.table import Table

from gradleak.cli.common import add_sweep_options, non_negative_int, positive_int
from gradleak.progress_bars import StageBars


def add(commands: argparse._SubParsersAction) -> None:
    defend = commands.add_parser(
        "defend",
        help="audit defenses: attack success and model accuracy per defense and strength",
        description="Attack the defended gradient with DLG and iDLG for every defense and "
        "strength, train LeNet with the same defense to measure its accuracy cost, and write "
        "OUT/results.jsonl, accuracy.jsonl, summary.json, defense.png, examples.png and "
        "report.md. Rerunning the same command on the same OUT resumes where it stopped.",
    )
    defend.add_argument("--dataset", default="mnist", help="mnist (default) or cifar100")
    defend.add_argument("--data-dir", default=None, help="folder holding the dataset's files")
    defend.add_argument(
        "--defense",
        default="all",
        help="all (default: the DLG paper's sweep plus DP-SGD), none, gaussian, laplacian, "
        "fp16, bf16, int8, prune, aggregate, batch or dpsgd",
    )
    defend.add_argument(
        "--strengths", default=None, help="comma-separated strengths for one defense, e.g. 0.01,0.1"
    )
    defend.add_argument(
        "--experiments", type=positive_int, default=8, help="victims per defense/strength (8)"
    )
    defend.add_argument(
        "--iterations", type=positive_int, default=50, help="L-BFGS steps per attack (50)"
    )
    defend.add_argument("--improved", action="store_true", help="attack in improved mode")
    defend.add_argument("--seed", type=non_negative_int, default=0, help="run seed (0)")
    defend.add_argument("--delta", type=float, default=1e-5, help="DP-SGD's delta (1e-5)")
    defend.add_argument("--out", default="runs/defend", help="output folder (runs/defend)")
    defend.add_argument(
        "--chunk",
        type=positive_int,
        default=64,
        help="victims attacked at once, one group of work per method (64)",
    )
    defend.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    add_sweep_options(defend)
    defend.set_defaults(handler=cmd_defend)


def cmd_defend(args: argparse.Namespace, console: Console) -> None:
    from gradleak.experiments.defend.report import baseline_entry, verdict_text
    from gradleak.experiments.defend.run import DefendRun, plan, run_defend

    defenses, strengths = plan(args.defense, args.strengths)
    run = DefendRun(
        dataset=args.dataset,
        data_dir=args.data_dir,
        defenses=defenses,
        strengths=strengths,
        experiments=args.experiments,
        iterations=args.iterations,
        improved=args.improved,
        seed=args.seed,
        delta=args.delta,
        out=args.out,
        chunk=args.chunk,
        device=args.device,
        command=shlex.join(["gradleak", *args.argv]),
        workers=args.workers,
        ray=args.ray,
    )
    names = {"attacks": "attacks (DLG + iDLG)", "training": "training runs (accuracy)"}
    with StageBars(console, "", names.__getitem__) as bars:
        summary = run_defend(run, callback=bars)
    table = Table(title="defense audit (attack success: share of MSE < 1e-2; accuracy)")
    for column in ("defense", "iDLG", "DLG", "accuracy", "verdict"):
        table.add_column(column)
    baseline = baseline_entry(summary["entries"])
    for entry in summary["entries"]:
        share = {m: entry["methods"][m]["fidelity"]["0.01"] for m in ("idlg", "dlg")}
        accuracy = entry["accuracy"]
        table.add_row(
            entry["label"],
            *("n/a" if share[m] is None else f"{100 * share[m]:.0f}%" for m in ("idlg", "dlg")),
            "n/a" if accuracy is None else f"{100 * accuracy:.1f}%",
            verdict_text(entry, baseline),
        )
    console.print(table)
    console.print(
        f"wrote {run.out}/results.jsonl, summary.json, defense.png and report.md "
        f"({summary['wall_seconds']:.0f} s)"
    )
