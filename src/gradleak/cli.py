"""The `gradleak` command: parses, calls an experiment, prints.

Every user error ends the same way: one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from typing import NoReturn

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from gradleak import __version__
from gradleak.errors import ConfigError, GradleakError
from gradleak.progress_bars import StageBars
from gradleak.progress_bars import progress as progress_bar

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see '{self.prog} --help')")


def _fail(message: str) -> NoReturn:
    print(f"gradleak: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _index_list(text: str) -> tuple[int, ...]:
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(
            f"expected whole numbers 0 or more separated by commas, got {text!r}"
        )
    return tuple(int(part) for part in parts)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gradleak",
        description="What does the gradient you share in federated learning give away?",
    )
    parser.add_argument("--version", action="version", version=f"gradleak {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    attack = commands.add_parser(
        "attack",
        help="rebuild a private image and its label from the gradient it produces",
        description="Simulate one client step on a private image and attack the shared "
        "gradient with DLG or iDLG. Writes OUT/metrics.json and OUT/reconstruction.png.",
    )
    attack.add_argument("--method", default="idlg", help="idlg (default) or dlg")
    attack.add_argument(
        "--dataset",
        default="sample",
        help="sample (built-in MNIST digits, default), sample-cifar100, mnist, cifar100, "
        "cifar10, lfw, svhn, or a path to an image file",
    )
    attack.add_argument("--data-dir", default=None, help="folder holding the dataset's files")
    attack.add_argument("--index", type=_non_negative_int, default=0, help="which image (0)")
    attack.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="attack the mean gradient of images INDEX..INDEX+B-1 (1)",
    )
    attack.add_argument(
        "--indices",
        type=_index_list,
        default=None,
        help="attack the mean gradient of these images, e.g. 3,17,42 (instead of --index)",
    )
    attack.add_argument(
        "--model", default="lenet", help="lenet (default), lenet-dlg, resnet20, resnet56"
    )
    attack.add_argument("--iterations", type=_positive_int, default=300, help="L-BFGS steps (300)")
    attack.add_argument("--seed", type=int, default=0, help="seed of model and dummy init (0)")
    attack.add_argument(
        "--improved",
        action="store_true",
        help="strong-Wolfe line search, float64, mid-grey start, per-step stop, restarts",
    )
    attack.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    attack.add_argument("--out", default="runs/attack", help="output folder (runs/attack)")
    attack.add_argument(
        "--num-classes", type=_positive_int, default=None, help="label space (LFW: 5749)"
    )
    attack.set_defaults(handler=_cmd_attack)
    _add_reproduce(commands)
    _add_text_commands(commands)
    _add_defend(commands)
    return parser


def _add_reproduce(commands: argparse._SubParsersAction) -> None:
    reproduce = commands.add_parser(
        "reproduce",
        help="rerun a paper's experiments: iDLG's Table 1 and Figure 1",
        description="Rerun the iDLG paper's protocol (a fresh LeNet and a random image per "
        "experiment, DLG and iDLG on the same gradient) and write OUT/results.jsonl, "
        "summary.json, fidelity.png, strip.png and report.md. Rerunning the same command "
        "on the same OUT resumes where it stopped.",
    )
    reproduce.add_argument("paper", help="idlg (Table 1, Fig. 1) or dlg-batch (DLG Table 2)")
    which = reproduce.add_mutually_exclusive_group()  # idlg needs one: checked there
    which.add_argument("--dataset", help="mnist, cifar100 or lfw")
    which.add_argument(
        "--all-datasets", action="store_true", help="all three, each into OUT/<dataset>/"
    )
    reproduce.add_argument("--data-dir", default=None, help="folder holding the datasets' files")
    reproduce.add_argument(
        "--experiments",
        type=_positive_int,
        default=None,
        help="experiments per dataset (idlg 1000) or per batch size (dlg-batch 100)",
    )
    reproduce.add_argument("--mode", default="faithful", help="faithful (default) or improved")
    reproduce.add_argument("--engine", default="batched", help="batched (default) or sequential")
    reproduce.add_argument("--seed", type=_non_negative_int, default=0, help="run seed (0)")
    reproduce.add_argument("--out", default=None, help="output folder (runs/reproduce-<paper>)")
    reproduce.add_argument(
        "--chunk",
        type=_positive_int,
        default=None,
        help="victims attacked at once (idlg 32; dlg-batch 16)",
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
        "--iterations", type=_positive_int, default=300, help="L-BFGS steps at most (300)"
    )
    reproduce.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    reproduce.set_defaults(handler=_cmd_reproduce)


def _cmd_attack(args: argparse.Namespace, console: Console) -> None:
    from gradleak.experiments.attack import AttackRun, run_attack

    run = AttackRun(
        method=args.method,
        dataset=args.dataset,
        data_dir=args.data_dir,
        index=args.index,
        model=args.model,
        iterations=args.iterations,
        seed=args.seed,
        improved=args.improved,
        device=args.device,
        out=args.out,
        num_classes=args.num_classes,
        batch_size=args.batch_size,
        indices=args.indices,
    )
    progress = _progress(console)
    task = progress.add_task(f"{run.method} attack", total=run.iterations, loss="")

    def on_step(step: int, loss: float) -> None:
        # The bar appears with the first step, so that bad input (found before
        # any step) prints its one error line and nothing else.
        if not progress.live.is_started:
            progress.start()
        progress.update(task, completed=min(step + 1, run.iterations), loss=f"{loss:.2e}")

    try:
        row = run_attack(run, callback=on_step)
        progress.update(task, completed=run.iterations)
    finally:
        if progress.live.is_started:
            progress.stop()
    console.print(_summary_table(row))
    console.print(f"wrote {run.out}/metrics.json and {run.out}/reconstruction.png")


def _cmd_reproduce(args: argparse.Namespace, console: Console) -> None:
    from gradleak.experiments.reproduce import DATASETS, ReproduceRun, run_reproduce

    if args.paper not in ("idlg", "dlg-batch"):
        raise ConfigError(f"unknown paper '{args.paper}': choose one of idlg, dlg-batch")
    if args.paper == "dlg-batch":
        from gradleak.experiments.reproduce_batch_cli import cmd_reproduce_batch

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
        chunk=args.chunk or 32,
        device=args.device,
        command=shlex.join(["gradleak", *args.argv]),
    )
    with StageBars(console, "experiments", lambda dataset: f"{run.paper} {dataset}") as bars:
        summaries = run_reproduce(run, callback=bars)
    console.print(_reproduce_table(summaries))
    console.print(
        f"wrote {run.out}/"
        + (
            "report.md"
            if run.nested
            else "results.jsonl, summary.json, fidelity.png, strip.png and report.md"
        )
    )


def _reproduce_table(summaries: list[dict]) -> Table:
    from gradleak.experiments.paper import LABEL_ACCURACY

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


def _progress(console: Console) -> Progress:
    return progress_bar(console, "loss {task.fields[loss]}")


def _summary_table(row: dict) -> Table:
    table = Table(title="gradleak attack", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")

    def fmt(value: object, spec: str) -> str:
        return "diverged" if value is None else format(value, spec)

    verdict = "correct" if row["label_correct"] else "WRONG"
    table.add_row("method", f"{row['method']}{' (improved)' if row['improved'] else ''}")
    if row.get("batch_size", 1) == 1:
        true = f"{row['true_label']}" + (f" ({row['true_class']})" if row["true_class"] else "")
        pred = f"{row['predicted_label']}" + (
            f" ({row['predicted_class']})" if row["predicted_class"] else ""
        )
        table.add_row("victim", f"{row['dataset']}[{row['index']}] on {row['model']}")
        table.add_row("true label", true)
        table.add_row("recovered label", f"{pred}  {verdict}")
        table.add_row("MSE", fmt(row["mse"], ".3e"))
    else:
        indices = ",".join(str(i) for i in row["indices"])
        table.add_row("victims", f"{row['dataset']}[{indices}] on {row['model']}")
        table.add_row("true labels", " ".join(str(v) for v in sorted(row["true_labels"])))
        pred = " ".join(str(v) for v in sorted(row["predicted_labels"]))
        table.add_row("recovered labels", f"{pred}  {verdict}")
        per_image = " ".join(fmt(m, ".1e") for m in row["per_image_mse"])
        table.add_row("MSE (mean; per image)", f"{fmt(row['mse'], '.3e')}; {per_image}")
    table.add_row("PSNR (dB)", fmt(row["psnr"], ".1f"))
    table.add_row("SSIM", fmt(row["ssim"], ".3f"))
    table.add_row("matching loss", fmt(row["matching_loss"], ".2e"))
    table.add_row("steps / evaluations", f"{row['iterations']} / {row['evaluations']}")
    table.add_row("restarts", str(row["restarts"]))
    table.add_row("time", f"{row['seconds']:.1f} s on {row['device']}")
    return table


def _add_text_commands(commands: argparse._SubParsersAction) -> None:
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
    text.add_argument("--iterations", type=_positive_int, default=100, help="L-BFGS steps (100)")
    text.add_argument(
        "--trace-every", type=_positive_int, default=1, help="trace every N steps (1)"
    )
    text.add_argument("--seed", type=int, default=0, help="seed of model and dummy init (0)")
    text.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    text.add_argument("--out", default="runs/attack-text", help="output folder")
    text.set_defaults(handler=_cmd_attack_text)

    figure = commands.add_parser(
        "reproduce-text",
        help="regenerate DLG's text figure on the built-in BERT",
        description="Attack three conference-page sentences and write OUT/report.md (our "
        "decoded dummies beside the paper's figure), summary.json and one trace per sentence.",
    )
    figure.add_argument(
        "--mode", default="improved", help="improved (default), faithful, or both (comma list)"
    )
    figure.add_argument("--iterations", type=_positive_int, default=100, help="L-BFGS steps")
    figure.add_argument("--seed", type=_non_negative_int, default=0, help="run seed (0)")
    figure.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    figure.add_argument("--out", default="runs/reproduce-text", help="output folder")
    figure.set_defaults(handler=_cmd_reproduce_text)


def _cmd_attack_text(args: argparse.Namespace, console: Console) -> None:
    from gradleak.experiments.attack_text import DEFAULT_SENTENCE, TextAttackRun, run_attack_text

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
    progress = _progress(console)
    task = progress.add_task(f"text {run.mode} attack", total=run.iterations, loss="")

    def on_step(step: int, loss: float) -> None:
        if not progress.live.is_started:  # bad input fails before any step
            progress.start()
        progress.update(task, completed=min(step, run.iterations), loss=f"{loss:.2e}")

    try:
        row = run_attack_text(run, callback=on_step)
        progress.update(task, completed=run.iterations)
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


def _cmd_reproduce_text(args: argparse.Namespace, console: Console) -> None:
    from gradleak.experiments.reproduce_text import TextReproduceRun, run_reproduce_text

    modes = ("improved", "faithful") if args.mode == "both" else tuple(args.mode.split(","))
    run = TextReproduceRun(
        modes=modes,
        iterations=args.iterations,
        seed=args.seed,
        device=args.device,
        out=args.out,
        command=shlex.join(["gradleak", *args.argv]),
    )
    with StageBars(console, "sentences", lambda mode: f"DLG text, {mode}") as bars:
        summary = run_reproduce_text(run, callback=bars)
    for mode, stats in summary["modes"].items():
        console.print(
            f"{mode}: mean token accuracy {stats['token_accuracy']:.2f}, "
            f"{100 * stats['exact']:.0f}% of sentences exact, {stats['seconds']} s"
        )
    console.print(f"wrote {run.out}/report.md, summary.json and the traces")


def _add_defend(commands: argparse._SubParsersAction) -> None:
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
        "--experiments", type=_positive_int, default=8, help="victims per defense/strength (8)"
    )
    defend.add_argument(
        "--iterations", type=_positive_int, default=50, help="L-BFGS steps per attack (50)"
    )
    defend.add_argument("--improved", action="store_true", help="attack in improved mode")
    defend.add_argument("--seed", type=_non_negative_int, default=0, help="run seed (0)")
    defend.add_argument("--delta", type=float, default=1e-5, help="DP-SGD's delta (1e-5)")
    defend.add_argument("--out", default="runs/defend", help="output folder (runs/defend)")
    defend.add_argument(
        "--chunk", type=_positive_int, default=64, help="victims attacked at once (64)"
    )
    defend.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    defend.set_defaults(handler=_cmd_defend)


def _cmd_defend(args: argparse.Namespace, console: Console) -> None:
    from gradleak.experiments.defend import DefendRun, plan, run_defend
    from gradleak.experiments.defend_report import verdict_text

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
    )
    names = {"attacks": "attacks (DLG + iDLG)", "training": "training runs (accuracy)"}
    with StageBars(console, "", names.__getitem__) as bars:
        summary = run_defend(run, callback=bars)
    table = Table(title="defense audit (attack success: share of MSE < 1e-2; accuracy)")
    for column in ("defense", "iDLG", "DLG", "accuracy", "verdict"):
        table.add_column(column)
    for entry in summary["entries"]:
        share = {m: entry["methods"][m]["fidelity"]["0.01"] for m in ("idlg", "dlg")}
        accuracy = entry["accuracy"]
        table.add_row(
            entry["label"],
            *("n/a" if share[m] is None else f"{100 * share[m]:.0f}%" for m in ("idlg", "dlg")),
            "n/a" if accuracy is None else f"{100 * accuracy:.1f}%",
            verdict_text(entry),
        )
    console.print(table)
    console.print(
        f"wrote {run.out}/results.jsonl, summary.json, defense.png and report.md "
        f"({summary['wall_seconds']:.0f} s)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # quoted in reports
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    console = Console(stderr=False)
    try:
        args.handler(args, console)
    except GradleakError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        print("gradleak: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
