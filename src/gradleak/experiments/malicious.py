"""`gradleak attack --threat binning`: one dishonest server, one or more clients' batches.

The server crafts the weights of the clients' own model (`attacks/imprint.py`:
binning on its first Linear layer, bins set on images it holds: the dataset's
last `PUBLIC` images, never the victims; with a single Linear layer, the output
layer's rows; convolutions below set to pass the input through), each client takes one step on its
batch (FedSGD), and the server reads the examples back from the gradient, or
from the secure aggregate of `clients` clients.  Crafted weights live only in
this process: nothing is written but the metrics and the picture.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from gradleak import metrics
from gradleak.attacks.imprint import dishonest_attack, with_imprint
from gradleak.data import load_dataset
from gradleak.errors import ConfigError
from gradleak.experiments.common import finite_or_none, write_json
from gradleak.models import resolve_model
from gradleak.models.user import normalize_input, parse_model_args, parse_normalization
from gradleak.outdir import prepare_out
from gradleak.report import save_strip_rows
from gradleak.threat import observe_aggregate

THREATS = ("honest", "binning", "trap", "imprint")
IMPRINT_BINS = 1024  # the imprint block's default width (Robbing the Fed uses hundreds)
PUBLIC = 1000
EXACT_MSE = 1e-4


@dataclass(frozen=True)
class MaliciousRun:
    """One dishonest server's attack on `clients` batches of `batch_size` images each."""

    threat: str = "binning"
    model: str = "mlp"
    dataset: str = "mnist"
    data_dir: str | None = None
    batch_size: int = 64
    clients: int = 1
    index: int = 0
    bins: int | None = None
    width: int | None = None
    model_args: tuple[str, ...] = ()
    normalize: str | None = None
    seed: int = 0
    out: str = "runs/attack"


def run_malicious(run: MaliciousRun) -> dict[str, Any]:
    """Craft, observe, decode; write metrics.json and reconstruction.png; return the metrics.

    Raises:
        ConfigError: An unknown threat, too few images, or a model the attack cannot use.
        AttackNotApplicable: The model has no Linear layer to trap, or layers below it that
            the pass-through construction cannot set.
    """
    if run.threat not in THREATS[1:]:
        raise ConfigError(f"unknown --threat '{run.threat}': choose trap, binning or imprint")
    data = load_dataset(run.dataset, data_dir=run.data_dir)
    model = resolve_model(
        run.model, input_shape=data.shape, num_classes=data.num_classes, seed=run.seed,
        width=run.width, model_args=parse_model_args(list(run.model_args)),
    )  # fmt: skip
    if run.threat == "imprint":  # the server ships the architecture: an imprint block in front
        model = with_imprint(model, data.shape, run.bins or IMPRINT_BINS, seed=run.seed)
    attack = dishonest_attack(model, run.bins)  # one line, before any work, if nothing to trap
    count = run.batch_size * run.clients
    public_count = min(PUBLIC, len(data) // 2)  # CIFAR-100's sample has 916 images
    if run.index + count > len(data) - public_count:
        raise ConfigError(
            f"{data.name} has {len(data)} images; {run.clients} x {run.batch_size} victims from "
            f"--index {run.index} would reach the server's last {public_count}: give fewer"
        )
    if run.normalize is not None:
        normalize_input(model, parse_normalization(run.normalize, data.shape[0]))
    out = prepare_out(run.out)
    public = torch.stack([data[i][0] for i in range(len(data) - public_count, len(data))])
    started = time.perf_counter()
    crafted, plan = attack.craft(model, public)
    victims = list(range(run.index, run.index + count))
    x = torch.stack([data[i][0] for i in victims])
    y = torch.tensor([data.label(i) for i in victims])
    batches = [
        (x[k * run.batch_size : (k + 1) * run.batch_size],
         y[k * run.batch_size : (k + 1) * run.batch_size])
        for k in range(run.clients)
    ]  # fmt: skip
    shared = observe_aggregate(crafted, batches)
    recovered = attack.decode(shared, plan).inputs.detach().float()
    normalisation = getattr(crafted, "gradleak_normalize", None)
    if normalisation is not None:  # the trap reads what the model sees: undo the normalisation
        shape = (1, -1) + (1,) * (recovered.dim() - 2)
        mean = torch.tensor(normalisation.mean).reshape(shape)
        std = torch.tensor(normalisation.std).reshape(shape)
        recovered = recovered * std + mean
    seconds = time.perf_counter() - started
    # Exact means at the resolution the crafted convolutions let through: against the
    # originals reduced the same way (block means or maxima); PSNR against the originals.
    reduced = x if plan.front is None else plan.front.reduce(x).float()
    errors = ((recovered[:, None] - reduced[None]) ** 2).flatten(2).mean(-1)
    best, which = errors.min(0)
    exact = int((best < EXACT_MSE).sum())
    psnr = [metrics.psnr(recovered[j], x[i]) for i, j in enumerate(which.tolist())]
    row = {
        "threat": run.threat, "model": run.model, "dataset": data.name, "clients": run.clients,
        "batch_size": run.batch_size, "images": count,
        "bins": len(getattr(plan, "thresholds", ())), "attack": attack.name,
        "bins_occupied": len(recovered),
        "resolution": "full" if plan.front is None else plan.front.resolution,
        "exact": exact, "exact_share": exact / count,
        "per_image_mse": [finite_or_none(float(v)) for v in best],
        "psnr": finite_or_none(sum(p for p in psnr if math.isfinite(p)) / max(1, len(psnr))),
        "seconds": round(seconds, 3), "seed": run.seed, "torch": torch.__version__,
    }  # fmt: skip
    if plan.front is not None and plan.front.batchnorm:
        row["note"] = (
            "train-mode BatchNorm: each channel comes back up to one affine map (the batch's "
            "statistics), estimated from the server's own images, so not exact"
        )
    write_json(out / "metrics.json", row)
    shown = min(count, 16)
    frames = [("private", [(str(int(y[i])), x[i]) for i in range(shown)]),
              ("read back", [(f"{float(best[i]):.0e}", recovered[int(which[i])].clamp(0, 1))
                             for i in range(shown)])]  # fmt: skip
    title = (
        f"dishonest server, {attack.name} on '{plan.layer}': {exact} of {count} images read back "
        f"exactly ({run.clients} client{'s' if run.clients > 1 else ''} of {run.batch_size})"
    )
    save_strip_rows(out / "reconstruction.png", frames, title=title)
    return row
