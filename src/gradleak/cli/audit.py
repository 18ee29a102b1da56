"""`gradleak audit` and `gradleak flower-demo`: what a Flower run's server could rebuild.

`audit` reads a capture folder (no Flower needed); `flower-demo` needs the
flower extra and says so in one line without it.  Both end with the verdict,
a table per round and client, and the files written.  Captures the audit
refused are one line each on stderr, and the command then exits 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from gradleak.cli.common import (
    EXIT_USAGE,
    add_optimizer_options,
    add_sweep_options,
    client_optimizer,
    index_list,
    non_negative_int,
    positive_int,
)
from gradleak.cli.train import positive_float
from gradleak.errors import ConfigError
from gradleak.progress_bars import StageBars


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number 0 or more, got {text}")
    return value


def shape(text: str) -> tuple[int, int, int]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 1,28,28), got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _attack_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the attack")
    group.add_argument(
        "--method",
        default="auto",
        choices=("auto", "idlg", "dlg", "ig"),
        help="auto (default): improved iDLG on one-step gradients of sigmoid conv nets, "
        "Inverting Gradients on several steps, clipped updates and other models",
    )
    group.add_argument(
        "--iterations",
        type=positive_int,
        default=None,
        help="optimiser steps (method's own; IG 500)",
    )
    group.add_argument(
        "--tv-scale",
        type=non_negative_float,
        default=1e-3,
        help="IG's total-variation weight (1e-3)",
    )
    group.add_argument("--seed", type=non_negative_int, default=0, help="seed (0)")


def add(commands: argparse._SubParsersAction) -> None:
    audit = commands.add_parser(
        "audit",
        help="attack every client of a captured Flower run (LeakageAudit's folder)",
        description="Read the folder gradleak.integrations.flower.LeakageAudit wrote, turn every "
        "client's reply of every round into what the server holds (one local step: the "
        "gradient, -update/lr; several: the update and the local schedule sent), attack it and "
        "write report.md (verdict first), leakage.json and a PNG strip per client and round.",
    )
    audit.add_argument("captures", metavar="CAPTURES", help="the capture folder")
    audit.add_argument("--out", default="runs/audit", help="where the report goes (runs/audit)")
    _attack_options(audit)
    model = audit.add_argument_group("the model, when the capture does not name it")
    model.add_argument(
        "--model",
        default=None,
        help="a gradleak model name (e.g. lenet), or your app's own as package.module:Name "
        "(e.g. app.task:Net, run from the app's folder); checked against the capture",
    )
    model.add_argument("--input-shape", type=shape, default=None, help="C,H,W, e.g. 1,28,28")
    model.add_argument("--num-classes", type=positive_int, default=None, help="e.g. 10")
    model.add_argument("--width", type=positive_int, default=None, help="convnet/resnet18 width")
    model.add_argument(
        "--model-arg",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a keyword argument of your model's class or function (repeatable)",
    )
    model.add_argument(
        "--normalize",
        default=None,
        metavar="MEAN,STD",
        help="the clients' input normalisation, e.g. 0.5,0.5 (or C means then C stds)",
    )
    schedule = audit.add_argument_group(
        "the clients' training, where the train config does not say it"
    )
    schedule.add_argument(
        "--flwr-app",
        default=None,
        metavar="APP",
        help="a Flower app folder: read lr, local-epochs and batch-size from its pyproject.toml",
    )
    schedule.add_argument("--lr", type=positive_float, default=None, help="local learning rate")
    schedule.add_argument("--local-epochs", type=positive_int, default=None, help="epochs (E)")
    schedule.add_argument("--local-steps", type=positive_int, default=None, help="steps (K)")
    schedule.add_argument("--batch-size", type=positive_int, default=None, help="mini-batch (b)")
    schedule.add_argument(
        "--drop-last", action="store_true", help="the clients drop a short last mini-batch"
    )
    add_optimizer_options(schedule)
    schedule.add_argument(
        "--max-examples",
        type=non_negative_int,
        default=16,
        help="rebuild images for clients of at most this many examples (16); labels always",
    )
    line = audit.add_argument_group("where the line lies (optional)")
    line.add_argument(
        "--line-data",
        default=None,
        metavar="DATA",
        help="a dataset name or a folder of class subfolders of images: attack synthetic "
        "clients of growing size trained like yours, to find where images stop coming back",
    )
    line.add_argument("--line-data-dir", default=None, help="the folder of --line-data's files")
    line.add_argument(
        "--line-sizes", type=index_list, default=(1, 2, 4, 8, 16), help="client sizes (1,2,4,8,16)"
    )
    add_sweep_options(audit)
    audit.set_defaults(handler=cmd_audit)

    demo = commands.add_parser(
        "flower-demo",
        help="run a real Flower simulation wrapped in LeakageAudit, then audit it",
        description="Simulate a Flower federation on this machine (Flower's simulation engine "
        "on Ray, offline), FedAvg wrapped in LeakageAudit, clients training on private images "
        "of the test split (--task text: LoRA fine-tuning of a built-in GPT-2-shaped decoder on "
        "private sentences, adapters only exchanged), then audit what the server captured. Needs "
        'pip install "gradleak[flower]".',
    )
    demo.add_argument(
        "--task",
        default="image",
        help="image (default): clients train on private images; text: federated LoRA "
        "fine-tuning of a built-in decoder on private sentences",
    )
    demo.add_argument("--clients", type=positive_int, default=4, help="simulated clients (4)")
    demo.add_argument(
        "--rounds", type=positive_int, default=None, help="federated rounds (2; text 3)"
    )
    demo.add_argument("--dataset", default="mnist", help="mnist (default), cifar100, sample, ...")
    demo.add_argument("--data-dir", default=None, help="folder holding the dataset's files")
    demo.add_argument(
        "--model", default=None, help="lenet (default), convnet, ...; text: gpt2-tiny (default)"
    )
    demo.add_argument("--width", type=positive_int, default=None, help="convnet/resnet18 width")
    demo.add_argument(
        "--local-steps",
        type=positive_int,
        default=None,
        help="client SGD steps per round, K (1; text 3)",
    )
    demo.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="private images (text: sentences) per client per round (1)",
    )
    demo.add_argument(
        "--lr", type=positive_float, default=None, help="client SGD lr (0.01; text 0.5)"
    )
    text = demo.add_argument_group("--task text")
    text.add_argument(
        "--sentences-per-client",
        type=positive_int,
        default=4,
        help="private sentences each client holds (4), from the shipped set",
    )
    text.add_argument("--lora-rank", type=positive_int, default=32, help="LoRA rank r (32)")
    text.add_argument("--lora-alpha", type=positive_float, default=64.0, help="LoRA alpha (64)")
    demo.add_argument(
        "--flower-dp",
        default="none",
        choices=("none", "server-fixed", "client-fixed", "local"),
        help="Flower's DP: server-side or client-side fixed clipping, or LocalDpMod (none)",
    )
    demo.add_argument("--secagg", action="store_true", help="SecAgg+ (Flower's legacy stack)")
    demo.add_argument(
        "--malicious",
        default="none",
        choices=("none", "binning", "trap"),
        help="a dishonest server: it sends weights crafted to read the clients' images back "
        "(weights only: binning on the first Linear layer, or the output layer's rows when the "
        "model has one Linear layer; convolutions below set to pass the input through)",
    )
    demo.add_argument(
        "--guard", action="store_true", help="the clients run ModelGuard, refusing crafted weights"
    )
    demo.add_argument(
        "--dp-clipping-norm", type=positive_float, default=0.1, help="DP clipping norm (0.1)"
    )
    demo.add_argument(
        "--dp-noise-multiplier",
        type=non_negative_float,
        default=1.0,
        help="central DP noise multiplier (1.0)",
    )
    demo.add_argument(
        "--dp-epsilon", type=positive_float, default=10.0, help="LocalDpMod epsilon (10)"
    )
    demo.add_argument("--dp-delta", type=positive_float, default=1e-5, help="LocalDpMod delta")
    demo.add_argument("--out", default="runs/flower-demo", help="where everything goes")
    demo.add_argument(
        "--cpus", type=positive_int, default=None, help="CPUs for Ray (cores, at most --clients)"
    )
    _attack_options(demo)
    demo.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="audit worker processes (default: one per CPU core; 1: this process)",
    )
    demo.set_defaults(handler=cmd_flower_demo)


def cmd_audit(args: argparse.Namespace, console: Console) -> None:
    from gradleak.experiments.audit.run import AuditRun, run_audit
    from gradleak.experiments.audit.text import is_text_capture, run_text_audit

    if is_text_capture(args.captures):
        # LoRA fine-tuning of a language model: the capture names the model; the span attack.
        if args.model is not None:
            raise ConfigError("this capture names its language model: leave out --model")
        with StageBars(console, "") as bars:
            text = run_text_audit(
                args.captures, args.out, command=shlex.join(["gradleak", *args.argv]),
                callback=bars,
            )  # fmt: skip
        _print_text(console, text.summary, args.out)
        _refused(text.problems)
        return
    model = audit_model(args)
    run = AuditRun(
        captures=args.captures,
        out=args.out,
        method=args.method,
        iterations=args.iterations,
        tv_scale=args.tv_scale,
        model=model,
        seed=args.seed,
        workers=args.workers,
        ray=args.ray,
        command=shlex.join(["gradleak", *args.argv]),
        schedule=audit_schedule(args),
        max_examples=args.max_examples,
        line_data=args.line_data,
        line_data_dir=args.line_data_dir,
        line_sizes=tuple(args.line_sizes),
    )
    with StageBars(console, "") as bars:
        result = run_audit(run, callback=bars)
    _print(console, result.summary, args.out)
    _refused(result.problems)


def audit_model(args: argparse.Namespace) -> Any:
    """The `ModelInfo` the options name, or None to take the capture's."""
    from gradleak.integrations.capture import ModelInfo
    from gradleak.models import is_import_path, resolve_model
    from gradleak.models.user import parse_model_args, parse_normalization

    given = [args.input_shape is not None, args.num_classes is not None]
    if args.model is None:
        if any(given) or args.width is not None or args.model_arg:
            raise ConfigError(
                "--input-shape, --num-classes, --width and --model-arg go with --model"
            )
        if args.normalize is not None:
            raise ConfigError("--normalize goes with --model (the capture records its own)")
        return None
    model_args = parse_model_args(args.model_arg)
    if is_import_path(args.model):
        # Built here to learn its shape and classes; the audit checks its fingerprint.
        built = resolve_model(
            args.model, input_shape=args.input_shape, num_classes=None, model_args=model_args
        )
        spec = built.gradleak_spec
        input_shape, num_classes = spec.input_shape, spec.num_classes
    else:
        if not all(given):
            raise ConfigError("--model NAME needs --input-shape C,H,W and --num-classes N")
        input_shape, num_classes = args.input_shape, args.num_classes
    normalize = None
    if args.normalize is not None:
        normalize = parse_normalization(args.normalize, input_shape[0]).to_json()
    return ModelInfo(args.model, input_shape, num_classes, args.width, None, normalize, model_args)


def audit_schedule(args: argparse.Namespace) -> Any:
    """The `ClientSchedule` from --flwr-app and the schedule options (options win)."""
    from gradleak.experiments.audit.app import schedule_from_app
    from gradleak.experiments.audit.load import ClientSchedule

    values: dict[str, Any] = {}
    sources = []
    if args.flwr_app is not None:
        values, file = schedule_from_app(args.flwr_app)
        sources.append(file)
    options = {
        "lr": args.lr, "epochs": args.local_epochs, "local_steps": args.local_steps,
        "batch_size": args.batch_size,
    }  # fmt: skip
    given = {k: v for k, v in options.items() if v is not None}
    if args.local_epochs is not None and args.local_steps is not None:
        raise ConfigError("give --local-epochs or --local-steps, not both")
    if given.keys() & {"epochs", "local_steps"}:
        values.pop("epochs", None)
        values.pop("local_steps", None)
    values |= given
    if given:
        sources.append("options")
    return ClientSchedule(
        **values,
        optimizer=client_optimizer(args),
        drop_last=args.drop_last,
        source=" + ".join(sources),
    )


def cmd_flower_demo(args: argparse.Namespace, console: Console) -> None:
    from gradleak.experiments.flower_demo.run import run_flower_demo
    from gradleak.experiments.flower_demo.settings import TEXT_DEFAULTS, DemoRun

    image = {"model": "lenet", "lr": 0.01, "local_steps": 1, "batch_size": 1, "rounds": 2}
    defaults = TEXT_DEFAULTS if args.task == "text" else image
    given = {key: getattr(args, key) for key in defaults}
    chosen = {key: defaults[key] if value is None else value for key, value in given.items()}
    run = DemoRun(
        task=args.task,
        clients=args.clients,
        rounds=chosen["rounds"],
        dataset=args.dataset,
        model=chosen["model"],
        width=args.width,
        local_steps=chosen["local_steps"],
        batch_size=chosen["batch_size"],
        lr=chosen["lr"],
        sentences_per_client=args.sentences_per_client,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        flower_dp=args.flower_dp,
        secagg=args.secagg,
        dp_clipping_norm=args.dp_clipping_norm,
        dp_noise_multiplier=args.dp_noise_multiplier,
        dp_epsilon=args.dp_epsilon,
        dp_delta=args.dp_delta,
        seed=args.seed,
        data_dir=args.data_dir,
        out=args.out,
        method=args.method,
        iterations=args.iterations,
        tv_scale=args.tv_scale,
        workers=args.workers,
        cpus=args.cpus,
        command=shlex.join(["gradleak", *args.argv]),
        malicious=args.malicious,
        guard=args.guard,
    )
    with StageBars(console, "") as bars:
        result = run_flower_demo(run, callback=bars)
    how = (
        f"Flower simulation: {result.simulation_seconds:.0f} s"
        if result.simulated
        else "captures of an earlier simulation with these settings found: audited them"
    )
    console.print(how)
    if args.task == "text":
        _print_text(console, result.audit.summary, args.out)
    else:
        _print(console, result.audit.summary, args.out)
    _refused(result.audit.problems)


def _print_text(console: Console, summary: dict[str, Any], out: str) -> None:
    """The text audit: a row per round and client, each client's sentences, the verdict."""
    from gradleak.experiments.audit.text import text_verdict

    table = Table(title="what the server rebuilt from the LoRA updates, per round and client")
    for column in ("round", "node", "sentences", "exact", "ROUGE-1", "ROUGE-2", "token acc."):
        table.add_column(column)
    for e in summary["entries"]:
        node = f"...{str(e['node_id'])[-6:]}"
        n = len(e["truth"]) if e.get("truth") else e.get("num_examples") or "?"
        if "exact" in e:
            cells = [
                f"{e['exact_count']}/{n}", f"{100 * e['rouge1']:.1f}", f"{100 * e['rouge2']:.1f}",
                f"{100 * e['token_accuracy']:.1f}",
            ]  # fmt: skip
        elif e.get("recovered"):  # no ground truth beside the capture: what came back
            cells = [f"{len(e['recovered'])} rebuilt", "-", "-", "-"]
        else:
            cells = ["not rebuilt", "-", "-", "-"]
        table.add_row(str(e["round"]), node, str(n), *cells)
    console.print(table)
    for e in summary["entries"]:
        where = f"round {e['round']} ...{str(e['node_id'])[-6:]}"
        for s in e.get("sentences", []):
            mark = "=" if s["exact"] else "~"
            console.print(f"{where} {mark} {s['recovered']!r}", markup=False, highlight=False)
        if "sentences" not in e:
            for text in e.get("recovered") or []:
                console.print(f"{where} {text!r}", markup=False, highlight=False)
    for line in text_verdict(summary):
        console.print(line, markup=False, highlight=False)
    console.print(f"wrote {out}/report.md and {out}/text-leakage.json")


def _print(console: Console, summary: dict[str, Any], out: str) -> None:
    from gradleak.experiments.audit.report import verdict

    table = Table(title="what the server rebuilt, per round and client")
    for column in (
        "round",
        "node",
        "server saw",
        "method",
        "labels: true -> read",
        "MSE",
        "rebuilt",
        "verdict",
    ):
        table.add_column(column)
    for e in summary["entries"]:
        node = "aggregate" if e["node_id"] is None else f"...{str(e['node_id'])[-6:]}"
        true = _short(e["true_labels"], e.get("label_counts_true"))
        read = _short(e["predicted_labels"], e.get("label_counts_read"))
        mse = "n/a" if e["mse"] is None else f"{e['mse']:.1e}"
        if e["error"]:
            rebuilt = "not audited" if e["method"] is None else "attack failed"
        elif e["method"] == "labels":
            rebuilt = "labels only"
        elif e["images_rebuilt"] is None:
            rebuilt = "matched" if e["converged"] else "not matched"
        else:
            rebuilt = f"{e['images_rebuilt']}/{e['num_examples']}"
        table.add_row(
            str(e["round"]), node, str(e["shared"] or "-"), str(e["method"] or "-"),
            f"{true} -> {read}", mse, rebuilt, e.get("verdict") or "",
        )  # fmt: skip
    console.print(table)
    for line in verdict(summary):
        console.print(line.replace("**", ""), markup=False, highlight=False)
    console.print(f"wrote {out}/report.md, leakage.json, overview.png and strips/")


def _short(labels: list[int] | None, histogram: dict[str, int] | None) -> str:
    """A few labels as a list, many as class x count."""
    if labels is not None and len(labels) <= 8:
        return ",".join(map(str, labels))
    if histogram is not None:
        return " ".join(f"{c}x{n}" for c, n in histogram.items())
    return "?" if labels is None else f"{len(labels)} labels"


def _refused(problems: tuple[str, ...]) -> None:
    """One line per refused capture on stderr; then exit 2 (the rest is audited and written)."""
    if not problems:
        return
    for problem in problems:
        print(f"gradleak: error: {problem}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)
