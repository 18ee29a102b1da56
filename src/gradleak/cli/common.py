"""What every command module shares: one-line errors, option types, progress bars."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from rich.console import Console
from rich.progress import Progress, TaskID

from gradleak.progress_bars import progress as progress_bar

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see '{self.prog} --help')")


def fail(message: str) -> NoReturn:
    print(f"gradleak: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def index_list(text: str) -> tuple[int, ...]:
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(
            f"expected whole numbers 0 or more separated by commas, got {text!r}"
        )
    return tuple(int(part) for part in parts)


def loss_bar(console: Console) -> Progress:
    return progress_bar(console, "loss {task.fields[loss]}")


def finish_loss_bar(progress: Progress, task: TaskID, steps: int, loss: float | None) -> None:
    """End a loss bar where the attack stopped: its real step count and its final loss.

    An attack that converges early stops before its budget, and the loss its
    steps report is the optimiser's, not the one written to metrics.json.
    """
    progress.update(
        task, total=steps, completed=steps, loss="diverged" if loss is None else f"{loss:.2e}"
    )


def add_sweep_options(parser: argparse.ArgumentParser) -> None:
    """--workers and --ray, the same on every sweep command."""
    group = parser.add_argument_group("where the work runs")
    group.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="worker processes, one thread each (default: one per CPU core; 1: this process)",
    )
    group.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="run on Ray: local (start one here), auto or HOST:PORT (join a cluster); "
        'needs pip install "gradleak[ray]"',
    )


def add_user_model_options(parser: argparse.ArgumentParser) -> None:
    """--model-arg, --input-shape and --normalize: the user's own model and input domain."""
    group = parser.add_argument_group("your own model (--model package.module:Name)")
    group.add_argument(
        "--model-arg",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a keyword argument for your model's class or function (repeatable; JSON values)",
    )
    group.add_argument(
        "--input-shape",
        type=shape_triple,
        default=None,
        metavar="C,H,W",
        help="your model's input shape (default: read from the model)",
    )
    group.add_argument(
        "--normalize",
        default=None,
        metavar="MEAN,STD",
        help="the normalisation your data pipeline applies, e.g. 0.5,0.5 (or C means then C "
        "stds); attacks work on pixels in [0, 1] and feed the model normalised input",
    )


def shape_triple(text: str) -> tuple[int, int, int]:
    """``"3,32,32"`` -> ``(3, 32, 32)``."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected C,H,W (3 whole numbers), got '{text}'"
        ) from None
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected C,H,W (3 whole numbers of 1 or more), got '{text}'"
        )
    return values  # type: ignore[return-value]


def add_optimizer_options(group: argparse._ArgumentGroup) -> None:
    """The client's optimiser: --optimizer, --momentum, --nesterov, --weight-decay."""
    group.add_argument(
        "--optimizer",
        default="sgd",
        choices=("sgd", "adam", "adamw"),
        help="the client's optimiser (sgd)",
    )
    group.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (0)")
    group.add_argument("--nesterov", action="store_true", help="SGD with Nesterov momentum")
    group.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (0)")


def client_optimizer(args: argparse.Namespace) -> Any:
    """The `ClientOptimizer` the options name; a bad combination is a usage error."""
    from gradleak.types import ClientOptimizer

    try:
        return ClientOptimizer(
            kind=args.optimizer,
            momentum=args.momentum,
            nesterov=args.nesterov,
            weight_decay=args.weight_decay,
        )
    except ValueError as error:
        fail(f"the client's optimiser: {error}")
