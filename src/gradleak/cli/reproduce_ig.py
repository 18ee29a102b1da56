"""The console side of `gradleak reproduce ig`: options -> run, progress bars, table.

`reproduce ig` shares the `reproduce` parser with idlg and dlg-batch.  Three
of dlg-batch's options mean something for ig too, with other defaults
(``--batch-sizes`` 1,4,8, ``--model`` convnet, ``--iterations`` 200): their
parser defaults are wrapped here in markers (`_Default`) that behave as the
plain values for idlg and dlg-batch but tell ig that the user did not give
them.  The ig-only options default to None, and idlg and dlg-batch refuse
them (`refuse_ig_options`).
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from rich.console import Console
from rich.table import Table

from gradleak.cli.common import positive_int
from gradleak.errors import ConfigError
from gradleak.progress_bars import StageBars

# Options of the reproduce parser that ig reads or refuses, with their flags.
_SHARED = {"batch_sizes": "--batch-sizes", "model": "--model", "iterations": "--iterations"}
_REFUSED = {"methods": "--methods", "mode": "--mode", "engine": "--engine"}
_IG_ONLY = {
    "datasets": "--datasets",
    "weights": "--weights",
    "local_steps": "--local-steps",
    "local_lr": "--local-lr",
    "tv_scale": "--tv-scale",
    "batchnorm": "--batchnorm",
    "width": "--width",
    "train_epochs": "--train-epochs",
    "train_limit": "--train-limit",
}


class _DefaultText(str):
    """A parser default the user did not give (a str, as before, for idlg and dlg-batch)."""


class _DefaultInt(int):
    """A parser default the user did not give (an int, as before, for idlg and dlg-batch)."""


def _given(value: Any) -> bool:
    return not isinstance(value, _DefaultText | _DefaultInt)


def _plain(value: Any) -> Any:
    if isinstance(value, _DefaultText):
        return str(value)
    if isinstance(value, _DefaultInt):
        return int(value)
    return value


def add_options(parser: argparse.ArgumentParser) -> None:
    """Add ig's options to the `reproduce` parser and mark the shared defaults."""
    group = parser.add_argument_group(
        "ig only (Inverting Gradients; for ig --batch-sizes defaults to 1,4,8, --model to "
        "convnet (or resnet18), --iterations to 200 Adam steps, --experiments to 2, --chunk to 4; "
        "the defaults finish the table in about 40 minutes on 2 cores, see README)"
    )
    group.add_argument("--datasets", default=None, help="mnist,cifar100 (both)")
    group.add_argument(
        "--weights", default=None, help="untrained,trained (both; trained: trained by the run)"
    )
    group.add_argument(
        "--local-steps", default=None, help="client SGD steps K, 1 = FedSGD gradient (1,4)"
    )
    group.add_argument(
        "--local-lr", type=float, default=None, help="the client's SGD lr for K > 1 (0.001)"
    )
    group.add_argument(
        "--tv-scale", type=float, default=None, help="the attack's total-variation weight (0.2)"
    )
    group.add_argument(
        "--batchnorm",
        default=None,
        help="the clients' BatchNorm mode: eval (default: the server's running statistics, "
        "breaching's public buffers, the paper's and the peers' setting) or train (the "
        "batch's own statistics, as model.train())",
    )
    group.add_argument("--width", type=positive_int, default=None, help="model base width (16)")
    group.add_argument(
        "--train-epochs",
        type=positive_int,
        default=None,
        help="epochs of the trained model (mnist 1, cifar100 8)",
    )
    group.add_argument(
        "--train-limit",
        type=positive_int,
        default=None,
        help="train (80%%) and test (20%%) on only this many images (all)",
    )
    parser.set_defaults(
        **{
            dest: (_DefaultInt if isinstance(parser.get_default(dest), int) else _DefaultText)(
                parser.get_default(dest)
            )
            for dest in (*_SHARED, *_REFUSED)
        }
    )


def refuse_ig_options(args: argparse.Namespace) -> None:
    """For idlg and dlg-batch: refuse ig's options; hand on the shared defaults as plain values.

    Raises:
        ConfigError: An ig-only option was given.
    """
    given = [flag for dest, flag in _IG_ONLY.items() if getattr(args, dest, None) is not None]
    if given:
        raise ConfigError(f"{given[0]} is for 'reproduce ig'")
    for dest in (*_SHARED, *_REFUSED):
        setattr(args, dest, _plain(getattr(args, dest)))


def cmd_reproduce_ig(args: argparse.Namespace, console: Console) -> None:
    """Run `gradleak reproduce ig` from the `reproduce` subcommand's options.

    Raises:
        ConfigError: Bad or other papers' options (before anything is written).
    """
    from gradleak.experiments.reproduce_ig.run import (
        DATASETS,
        WEIGHTS,
        IGRun,
        parse_counts,
        parse_names,
        run_reproduce_ig,
    )

    refused = [flag for dest, flag in _REFUSED.items() if _given(getattr(args, dest))]
    if refused:
        raise ConfigError(f"{refused[0]} is not an option of 'reproduce ig'")
    options: dict[str, Any] = {}
    if args.datasets is not None and (args.dataset or args.all_datasets):
        raise ConfigError("give --datasets, or --dataset / --all-datasets, not both")
    if args.dataset:
        options["datasets"] = parse_names(args.dataset, "--dataset", DATASETS)
    elif args.datasets is not None:
        options["datasets"] = parse_names(args.datasets, "--datasets", DATASETS)
    if args.weights is not None:
        options["weights"] = parse_names(args.weights, "--weights", WEIGHTS)
    if _given(args.batch_sizes):
        options["batch_sizes"] = parse_counts(args.batch_sizes, "--batch-sizes", "1,4,8")
    if args.local_steps is not None:
        options["local_steps"] = parse_counts(args.local_steps, "--local-steps", "1,4")
    if _given(args.model):
        options["model"] = args.model
    if _given(args.iterations):
        options["iterations"] = args.iterations
    optional = {
        "experiments": args.experiments,
        "chunk": args.chunk,
        "out": args.out,
        "width": args.width,
        "local_lr": args.local_lr,
        "tv_scale": args.tv_scale,
        "batchnorm": args.batchnorm,
        "train_epochs": args.train_epochs,
        "train_limit": args.train_limit,
    }
    options.update({key: value for key, value in optional.items() if value is not None})
    run = IGRun(
        **options,
        data_dir=args.data_dir,
        seed=args.seed,
        device=args.device,
        command=shlex.join(["gradleak", *args.argv]),
        workers=args.workers,
        ray=args.ray,
    )
    with StageBars(console, "") as bars:
        summary = run_reproduce_ig(run, callback=bars)
    for dataset in summary["datasets"]:
        console.print(_table(summary, dataset))
    strips = ", ".join(f"strip-{d}.png" for d in summary["datasets"])
    console.print(
        f"wrote {run.out}/results.jsonl, summary.json, {strips} and report.md "
        f"({summary['wall_seconds']:.0f} s)"
    )


def _table(summary: dict, dataset: str) -> Table:
    trained = summary["trained"].get(dataset)
    accuracy = "" if trained is None else f"; trained model {100 * trained['test_accuracy']:.1f}%"
    table = Table(
        title=f"{dataset}: Inverting Gradients, {summary['iterations']:,} iterations (paper "
        f"{summary['paper_iterations']:,}){accuracy}; nearest published figure beside"
    )
    for column in ("weights", "B", "K", "N", "PSNR mean", "median", "SSIM", "labels", "peer"):
        table.add_column(column)

    def num(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    for entry in summary["tables"][dataset]:
        peer = entry["peer"]
        share = entry["labels_exact"]
        table.add_row(
            entry["weights"],
            str(entry["batch_size"]),
            str(entry["local_steps"]),
            str(entry["experiments"]),
            num(entry["psnr"]["mean"], ".1f"),
            num(entry["psnr"]["median"], ".1f"),
            num(entry["ssim"]["mean"], ".2f"),
            "n/a" if share is None else f"{100 * share:.0f}%",
            f"{peer['psnr']:.1f} dB ({peer['name']})",
        )
    return table
