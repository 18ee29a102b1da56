"""`gradleak train`: train a model on the data at hand and write its weights (safetensors)."""

from __future__ import annotations

import argparse
import shlex

from rich.console import Console

from gradleak.cli.common import add_user_model_options, non_negative_int, positive_int
from gradleak.progress_bars import StageBars


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def add(commands: argparse._SubParsersAction) -> None:
    from gradleak.experiments.train.run import BATCH, LR

    train = commands.add_parser(
        "train",
        help="train a model (convnet, resnet18, ...) and write its weights as safetensors",
        description="Train a model on a seeded 80/20 split of the dataset's test split (the "
        "data at hand), with Adam and cross-entropy, measure its accuracy on the held-out 20% "
        "and write every parameter and BatchNorm buffer to a safetensors file whose header "
        "says what the weights are, how they were trained and the accuracy they reached.",
    )
    train.add_argument(
        "--model",
        default="convnet",
        help="convnet (default), resnet18, lenet, resnet20, ..., or your own as "
        "package.module:Name",
    )
    train.add_argument(
        "--dataset", default="mnist", help="mnist (default), cifar10, cifar100 or svhn"
    )
    train.add_argument(
        "--epochs", type=positive_int, default=1, help="passes over the training part (1)"
    )
    train.add_argument(
        "--out", required=True, metavar="FILE", help="the weights file, e.g. convnet.safetensors"
    )
    train.add_argument("--data-dir", default=None, help="folder holding the dataset's files")
    train.add_argument(
        "--width",
        type=positive_int,
        default=None,
        help="base width of convnet (default 32) or resnet18 (default 64)",
    )
    train.add_argument(
        "--lr", type=positive_float, default=LR, help=f"Adam's learning rate ({LR:g})"
    )
    train.add_argument(
        "--batch-size", type=positive_int, default=BATCH, help=f"minibatch size ({BATCH})"
    )
    train.add_argument("--seed", type=non_negative_int, default=0, help="run seed (0)")
    train.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    train.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="use only N images of the seeded permutation (then split 80/20)",
    )
    add_user_model_options(train)
    train.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace, console: Console) -> None:
    from gradleak.experiments.train.run import TrainRun, run_train

    run = TrainRun(
        model=args.model,
        dataset=args.dataset,
        out=args.out,
        epochs=args.epochs,
        data_dir=args.data_dir,
        width=args.width,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        limit=args.limit,
        command=shlex.join(["gradleak", *args.argv]),
        model_args=tuple(args.model_arg or ()),
        input_shape=args.input_shape,
        normalize=args.normalize,
    )
    names = {"train": f"training {run.model}", "test": "testing"}
    with StageBars(console, "", names.__getitem__) as bars:
        result = run_train(run, callback=bars)
    console.print(result.summary, soft_wrap=True, highlight=False)
