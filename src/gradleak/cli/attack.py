"""`gradleak attack`: one private image (or batch), one shared gradient, one attack."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from gradleak.cli.common import (
    add_optimizer_options,
    add_user_model_options,
    client_optimizer,
    finish_loss_bar,
    index_list,
    non_negative_int,
    positive_int,
    progress_bar,
)


def add(commands: argparse._SubParsersAction) -> None:
    attack = commands.add_parser(
        "attack",
        help="rebuild a private image and its label from the gradient it produces",
        description="Simulate one client step on a private image and attack the shared "
        "gradient with DLG or iDLG. Writes OUT/metrics.json and OUT/reconstruction.png.",
    )
    attack.add_argument(
        "--method",
        default="idlg",
        help="idlg (default), dlg, ig (Inverting Gradients: ReLU/BatchNorm models, updates) "
        "or auto (the strongest that applies: improved iDLG on smooth models' gradients, "
        "ig otherwise; it says which)",
    )
    attack.add_argument(
        "--dataset",
        default="sample",
        help="sample (built-in MNIST digits, default), sample-cifar100, mnist, cifar100, "
        "cifar10, lfw, svhn, or a path to an image file",
    )
    attack.add_argument("--data-dir", default=None, help="folder holding the dataset's files")
    attack.add_argument("--index", type=non_negative_int, default=0, help="which image (0)")
    attack.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="attack the mean gradient of images INDEX..INDEX+B-1 (1)",
    )
    attack.add_argument(
        "--indices",
        type=index_list,
        default=None,
        help="attack the mean gradient of these images, e.g. 3,17,42 (instead of --index)",
    )
    attack.add_argument(
        "--model",
        default="lenet",
        help="lenet (default), lenet-dlg, resnet20, resnet56, convnet, resnet18, or your own "
        "as package.module:Name (a class or function returning an nn.Module)",
    )
    attack.add_argument(
        "--weights",
        default=None,
        metavar="FILE",
        help="trained weights for --model (a safetensors file from 'gradleak train')",
    )
    attack.add_argument(
        "--width", type=positive_int, default=None, help="base width of convnet or resnet18"
    )
    client = attack.add_argument_group("the client's local training (FedAvg)")
    client.add_argument(
        "--local-steps",
        type=positive_int,
        default=1,
        help="SGD steps the client runs before sending its weights (1: it shares a gradient)",
    )
    client.add_argument(
        "--local-batch",
        type=positive_int,
        default=None,
        help="images per local step (default: the whole batch)",
    )
    client.add_argument(
        "--local-lr",
        type=float,
        default=1e-3,
        help="the client's SGD learning rate (0.001, breaching's FedAvg client; the label "
        "rule for updates is exact at small rates, see README)",
    )
    client.add_argument(
        "--batchnorm",
        default="train",
        help="train (default: BatchNorm on the client's batch statistics, as model.train()) "
        "or eval (on the running statistics the server sent: breaching's 'public buffers')",
    )
    add_optimizer_options(client)
    add_user_model_options(attack)
    attack.add_argument(
        "--iterations",
        type=positive_int,
        default=None,
        help="optimiser steps (dlg/idlg: 300 L-BFGS steps; ig: stops at a plateau of its "
        "objective, at most 1,000 steps, unless this forces a count)",
    )
    attack.add_argument(
        "--preset",
        default="default",
        help="ig: default (gradleak's: plateau stop, BatchNorm-statistics prior; README) or "
        "paper (the published attack: 24,000 signed Adam steps with step decay, no other prior)",
    )
    attack.add_argument(
        "--cores",
        type=positive_int,
        default=1,
        help="ig: trials run at once, one a core, the one that matches best kept (1: one "
        "trial; 2 gave no better PSNR on a trained ConvNet, see README)",
    )
    attack.add_argument(
        "--tv-scale",
        type=float,
        default=None,
        help="ig: weight of the total-variation prior (0.2, the paper's ImageNet setting)",
    )
    attack.add_argument(
        "--labels",
        default="infer",
        help="infer (default: read from the gradient or update) or known (ig only)",
    )
    attack.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of model and dummy init (0)"
    )
    attack.add_argument(
        "--improved",
        action="store_true",
        help="strong-Wolfe line search, float64, mid-grey start, per-step stop, restarts",
    )
    attack.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    attack.add_argument("--out", default="runs/attack", help="output folder (runs/attack)")
    attack.add_argument(
        "--num-classes", type=positive_int, default=None, help="label space (LFW: 5749)"
    )
    threat = attack.add_argument_group("a dishonest server")
    threat.add_argument(
        "--threat",
        default="honest",
        choices=("honest", "binning", "trap", "imprint"),
        help="honest (default: the server attacks what it gets) or binning/trap: it crafts "
        "the weights it sends (a trap in the first Linear layer, or in the output layer when "
        "it is the only one; convolutions below pass the input through) and reads the batch back; "
        "imprint: it also puts Robbing the Fed's imprint block in front of the model",
    )
    threat.add_argument(
        "--clients", type=positive_int, default=1, help="with --threat: batches summed (SecAgg)"
    )
    threat.add_argument("--bins", type=positive_int, default=None, help="trap units (all)")
    attack.set_defaults(handler=cmd_attack)


def cmd_attack(args: argparse.Namespace, console: Console) -> None:
    if args.threat != "honest":
        _cmd_malicious(args, console)
        return
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
        weights=args.weights,
        width=args.width,
        local_steps=args.local_steps,
        local_batch=args.local_batch,
        local_lr=args.local_lr,
        labels=args.labels,
        batchnorm=args.batchnorm,
        tv_scale=args.tv_scale,
        preset=args.preset,
        cores=args.cores,
        num_classes=args.num_classes,
        batch_size=args.batch_size,
        indices=args.indices,
        model_args=tuple(args.model_arg or ()),
        input_shape=args.input_shape,
        normalize=args.normalize,
        optimizer=client_optimizer(args),
    )
    progress = psnr_bar(console)
    bar: dict[str, int] = {}  # the task and its total, once the attack is known

    def on_start(method: str, total: int, reason: str) -> None:
        if reason:
            console.print(f"--method auto: {reason}")
        bar["task"] = progress.add_task(f"{method} attack", total=total, loss="", psnr="")
        bar["total"] = total

    def on_step(step: int, loss: float) -> None:
        # The bar appears with the first step, so that bad input (found before
        # any step) prints its one error line and nothing else.
        if not progress.live.is_started:
            progress.start()
        progress.update(bar["task"], completed=min(step + 1, bar["total"]), loss=f"{loss:.2e}")

    def on_psnr(step: int, value: float) -> None:
        if progress.live.is_started:
            progress.update(bar["task"], psnr=f"  PSNR {value:.1f} dB")

    try:
        row = run_attack(run, callback=on_step, on_start=on_start, on_psnr=on_psnr)
        finish_loss_bar(progress, bar["task"], row["iterations"], row["matching_loss"])
    finally:
        if progress.live.is_started:
            progress.stop()
    console.print(summary_table(row))
    console.print(f"wrote {run.out}/metrics.json and {run.out}/reconstruction.png")


def psnr_bar(console: Console) -> Progress:
    """The loss bar with room for the dummies' PSNR (filled in by Inverting Gradients only)."""
    return progress_bar(console, "loss {task.fields[loss]}{task.fields[psnr]}")


def summary_table(row: dict) -> Table:
    table = Table(title="gradleak attack", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")

    def fmt(value: object, spec: str) -> str:
        return "diverged" if value is None else format(value, spec)

    verdict = "correct" if row["label_correct"] else "WRONG"
    picked = " (picked by auto)" if row.get("chosen_by") == "auto" else ""
    table.add_row("method", f"{row['method']}{' (improved)' if row['improved'] else ''}{picked}")
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
    if row.get("method") == "ig" and row.get("psnr_affine_corrected") is not None:
        table.add_row(
            "PSNR after the truth's scale/shift (dB)", fmt(row["psnr_affine_corrected"], ".1f")
        )
    table.add_row("SSIM", fmt(row["ssim"], ".3f"))
    table.add_row("matching loss", fmt(row["matching_loss"], ".2e"))
    table.add_row("steps / evaluations", f"{row['iterations']} / {row['evaluations']}")
    table.add_row("restarts", str(row["restarts"]))
    table.add_row("time", f"{row['seconds']:.1f} s on {row['device']}")
    return table


def _cmd_malicious(args: argparse.Namespace, console: Console) -> None:
    from gradleak.experiments.malicious import MaliciousRun, run_malicious

    row = run_malicious(
        MaliciousRun(
            threat=args.threat, model=args.model, dataset=args.dataset, data_dir=args.data_dir,
            batch_size=args.batch_size or 64, clients=args.clients, index=args.index,
            bins=args.bins, width=args.width, model_args=tuple(args.model_arg or ()),
            normalize=args.normalize, seed=args.seed, out=args.out,
        )
    )  # fmt: skip
    source = f"the aggregate of {row['clients']} clients" if row["clients"] > 1 else "the gradient"
    how = f"{row['bins']} bins" if row["bins"] else row["attack"]
    console.print(
        f"dishonest server ({row['threat']}, {how}): {row['exact']} of "
        f"{row['images']} images read back exactly (MSE < 1e-4, resolution: {row['resolution']}) "
        f"from {source} in {row['seconds']:.1f} s"
    )
    if "note" in row:
        console.print(row["note"])
    console.print(f"wrote {args.out}/metrics.json and {args.out}/reconstruction.png")
