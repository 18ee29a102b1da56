"""`gradleak reproduce idlg` (and the dispatch to `reproduce dlg-batch`)."""

from __future__ import annotations

import argparse
import shlex

from rich.console import Console
from rich.table import Table

from gradleak.cli.common import add_sweep_options, non_negative_int, positive_int
from gradleak.errors import ConfigError
from gradleak.progress_bars import StageBars


def add(commands: argparse._SubParsersAction) -> None:
    reproduce = commands.add_parser(
        "reproduce",
        help="rerun a paper's experiments: iDLG's Table 1 and Figure 1",
        description="Rerun the iDLG paper's protocol (a fresh LeNet and a random image per "
        "experiment, DLG and iDLG on the same gradient) and write OUT/results.jsonl, "
        "summary.json, fidelity.png, strip.png and report.md. Rerunning the same command "
        "on the same OUT resumes where it stopped.",
    )
    reproduce.add_argument(
        "paper",
        help="idlg (Table 1, Fig. 1), dlg-batch (DLG Table 2) or ig (an Inverting Gradients table)",
    )
    which = reproduce.add_mutually_exclusive_group()  # idlg needs one: checked there
    which.add_argument("--dataset", help="mnist, cifar100 or lfw")
    which.add_argument(
        "--all-datasets", action="store_true", help="all three, each into OUT/<dataset>/"
    )
    reproduce.add_argument("--data-dir", default=None, help="folder holding the datasets' files")
    reproduce.add_argument(
        "--experiments",
        type=positive_int,
        default=None,
        help="experiments per dataset (idlg 1000) or per batch size (dlg-batch 100)",
    )
    reproduce.add_argument("--mode", default="faithful", help="faithful (default) or improved")
    reproduce.add_argument("--engine", default="batched", help="batched (default) or sequential")
    reproduce.add_argument("--seed", type=non_negative_int, default=0, help="run seed (0)")
    reproduce.add_argument("--out", default=None, help="output folder (runs/reproduce-<paper>)")
    reproduce.add_argument(
        "--chunk",
        type=positive_int,
        default=None,
        help="victims per group of work, attacked at once by each method (idlg: by both; 16)",
    )
    batch = reproduce.add_argument_group("dlg-batch only")
    batch.add_argument("--batch-sizes", default="1,2,4,8", help="batch sizes (1,2,4,8)")
    batch.add_argument("--methods", default="dlg,improved", help="dlg,improved (both)")
    batch.add_argument(
        "--model",
        default="lenet-dlg",
        help="lenet-dlg (DLG's stride-free LeNet, default), lenet (iDLG's), resnet20, resnet56",
    )
    batch.add_argument(
        "--iterations", type=positive_int, default=300, help="L-BFGS steps at most (300)"
    )
    reproduce.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    add_sweep_options(reproduce)
    from gradleak.cli.reproduce_ig import add_options as add_ig_options

    add_ig_options(reproduce)  # ig's own options; marks the defaults it shares
    reproduce.set_defaults(handler=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace, console: Console) -> None:
    from gradleak.experiments.reproduce_idlg.run import DATASETS, ReproduceRun, run_reproduce

    if args.paper not in ("idlg", "dlg-batch", "ig"):
        raise ConfigError(f"unknown paper '{args.paper}': choose one of idlg, dlg-batch, ig")
    from gradleak.cli.reproduce_ig import cmd_reproduce_ig, refuse_ig_options

    if args.paper == "ig":
        cmd_reproduce_ig(args, console)
        return
    refuse_ig_options(args)
    if args.paper == "dlg-batch":
        from gradleak.cli.dlg_batch import cmd_reproduce_batch

        cmd_reproduce_batch(args, console)
        return
    run = ReproduceRun(
        paper=args.paper,
        datasets=DATASETS if args.all_datasets else ((args.dataset,) if args.dataset else ()),
        nested=args.all_datasets,
        data_dir=args.data_dir,
        experiments=args.experiments or 1000,
        mode=args.mode,
        engine=args.engine,
        seed=args.seed,
        out=args.out or "runs/reproduce-idlg",
        chunk=args.chunk or 16,
        device=args.device,
        command=shlex.join(["gradleak", *args.argv]),
        workers=args.workers,
        ray=args.ray,
    )
    with StageBars(console, "experiments", lambda dataset: f"{run.paper} {dataset}") as bars:
        summaries = run_reproduce(run, callback=bars)
    console.print(reproduce_table(summaries))
    console.print(
        f"wrote {run.out}/"
        + (
            "report.md"
            if run.nested
            else "results.jsonl, summary.json, fidelity.png, strip.png and report.md"
        )
    )


def reproduce_table(summaries: list[dict]) -> Table:
    from gradleak.experiments.reproduce_idlg.paper import LABEL_ACCURACY

    table = Table(title="label accuracy and fidelity (ours; paper in brackets)")
    for column in ("dataset", "method", "N", "label accuracy", "MSE < 1e-3", "diverged"):
        table.add_column(column)

    def pct(share: float | None) -> str:
        return "n/a" if share is None else f"{100 * share:.1f}%"

    for summary in summaries:
        for method, stats in summary["methods"].items():
            paper = LABEL_ACCURACY[summary["dataset"]][method]
            table.add_row(
                summary["dataset"],
                method,
                str(stats["experiments"]),
                f"{pct(stats['label_accuracy'])} ({pct(paper)})",
                pct(stats["fidelity"]["0.001"]),
                str(stats["diverged"]),
            )
    return table
