"""`gradleak attack`: one victim batch, one shared gradient, one reconstruction.

A batch of B images gives one mean gradient.  Which reconstruction belongs to
which original cannot be told from it, so they are paired by an optimal
assignment on MSE before any metric is computed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from gradleak import metrics
from gradleak.attacks import AttackConfig, GradientInversion, StepCallback, build_attack
from gradleak.attacks.auto import choose_attack
from gradleak.attacks.inverting import IGConfig, InvertingGradients
from gradleak.data import load_dataset
from gradleak.errors import ConfigError, DataError
from gradleak.experiments.common import (
    derive_seeds,
    finite_or_none,
    resolve_device,
    use_cpu_threads,
    write_json,
)
from gradleak.models import MODELS, is_import_path, resolve_model
from gradleak.models.user import normalize_input, parse_model_args, parse_normalization
from gradleak.models.weights import load_weights
from gradleak.outdir import prepare_out
from gradleak.report import save_strip, save_strip_rows
from gradleak.threat import observe, observe_update
from gradleak.types import ClientOptimizer, Observation, Reconstruction, UpdateObservation

log = logging.getLogger(__name__)

METHODS = ("idlg", "dlg", "ig", "auto")
IG_PRESETS = ("default", "paper")

# on_psnr(step, psnr): the dummies' PSNR against the truth, now and then (IG only).
PsnrCallback = Callable[[int, float], None]

# on_start(method, planned steps, reason): the attack picked, as it starts.
StartCallback = Callable[[str, int, str], None]


@dataclass(frozen=True)
class AttackRun:
    """One `gradleak attack` invocation.

    The victims are `indices` if given, else `batch_size` (default 1)
    consecutive images from `index`; their mean gradient is attacked at once.
    """

    method: str = "idlg"
    dataset: str = "sample"
    data_dir: str | None = None
    index: int = 0
    model: str = "lenet"
    iterations: int | None = None  # the method's own: 300 L-BFGS steps, IG's 24,000
    seed: int = 0
    improved: bool = False
    device: str = "auto"
    out: str = "runs/attack"
    num_classes: int | None = None
    batch_size: int | None = None
    indices: tuple[int, ...] | None = None
    weights: str | None = None
    width: int | None = None
    local_steps: int = 1
    local_batch: int | None = None
    local_lr: float = 1e-3
    labels: str = "infer"
    batchnorm: str = "train"
    tv_scale: float | None = None  # IG's total-variation weight; None: the attack's own (0.2)
    # The user's own model (`model` an import path) and input domain.
    model_args: tuple[str, ...] = ()
    input_shape: tuple[int, int, int] | None = None
    normalize: str | None = None
    optimizer: ClientOptimizer = field(default_factory=ClientOptimizer)
    preset: str = "default"  # IG: gradleak's defaults, or "paper" (the published settings)
    # IG: trials run at once, one a core, the one that matches best kept.
    cores: int = 1

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"--seed must be 0 or more, got {self.seed}")
        if self.local_steps < 1:
            raise ConfigError(f"--local-steps must be 1 or more, got {self.local_steps}")
        if self.labels not in ("infer", "known"):
            raise ConfigError(f"unknown --labels '{self.labels}': choose infer or known")
        if not (math.isfinite(self.local_lr) and self.local_lr > 0):
            raise ConfigError(f"--local-lr must be a number above 0, got {self.local_lr:g}")
        if self.batchnorm not in ("train", "eval"):
            raise ConfigError(f"unknown --batchnorm '{self.batchnorm}': choose train or eval")
        if self.tv_scale is not None and not (math.isfinite(self.tv_scale) and self.tv_scale >= 0):
            raise ConfigError(f"--tv-scale must be a number of 0 or more, got {self.tv_scale:g}")
        if self.tv_scale is not None and self.method in ("dlg", "idlg"):
            raise ConfigError("--tv-scale is Inverting Gradients' prior: use it with --method ig")
        if self.preset not in IG_PRESETS:
            raise ConfigError(f"unknown --preset '{self.preset}': choose {' or '.join(IG_PRESETS)}")
        if self.cores < 1:
            raise ConfigError(f"--cores must be 1 or more, got {self.cores}")
        if self.preset != "default" and self.method in ("dlg", "idlg"):
            raise ConfigError("--preset chooses Inverting Gradients' settings: use --method ig")

    def fedsgd(self, batch_size: int) -> bool:
        """Whether the client shares one gradient (one local step on its whole batch)."""
        return self.local_steps == 1 and self.local_batch in (None, batch_size)


def run_attack(
    run: AttackRun,
    *,
    callback: StepCallback | None = None,
    on_start: StartCallback | None = None,
    on_psnr: PsnrCallback | None = None,
) -> dict[str, Any]:
    """Simulate the victim, attack its gradient, write metrics.json and the strip.

    Args:
        run: What to attack and how.
        callback: Called after every optimiser step with ``(step, loss)``.
        on_start: Called once the attack is picked, before its first step,
            with the method, its planned steps and why it was picked.
        on_psnr: Inverting Gradients only: called every few steps with the
            PSNR of the dummies against the victims (the truth is known here).

    Returns:
        The metrics written to ``<out>/metrics.json``.
    """
    if not is_import_path(run.model) and run.model not in MODELS:
        raise ConfigError(
            f"unknown model '{run.model}': choose one of {', '.join(MODELS)}, "
            "or give your own as package.module:Name"
        )
    attack = _build_attack(run)  # None for auto: picked once the observation is there
    device = resolve_device(run.device)
    use_cpu_threads(device)
    # The third seed (the client's order of mini-batches) leaves the first two as they were.
    model_seed, attack_seed, client_seed = derive_seeds(run.seed, 3)
    user_model = None
    if is_import_path(run.model):
        # The user's model fixes the input shape; their data is fitted to it.
        user_model = resolve_model(
            run.model, input_shape=run.input_shape, num_classes=None, seed=model_seed,
            width=run.width, model_args=parse_model_args(list(run.model_args)),
        )  # fmt: skip
        shape = user_model.gradleak_spec.input_shape
    else:
        shape = run.input_shape
    dataset = load_dataset(
        run.dataset, data_dir=run.data_dir, num_classes=run.num_classes, shape=shape
    )
    indices = victim_indices(run, len(dataset), dataset.name)
    victims = [dataset[i] for i in indices]
    images = torch.stack([image for image, _ in victims])
    labels = [label for _, label in victims]
    out = prepare_out(run.out)  # before the attack: a bad --out must not lose it

    model = user_model or resolve_model(
        run.model,
        input_shape=dataset.shape,
        num_classes=dataset.num_classes,
        seed=model_seed,
        width=run.width,
        model_args=parse_model_args(list(run.model_args)),
    )
    if run.normalize is not None:
        normalize_input(model, parse_normalization(run.normalize, dataset.shape[0]))
    if run.weights is not None:
        load_weights(model, run.weights)  # one line if they are another model's
    model = model.to(device)
    targets = torch.tensor(labels, device=device)
    if run.fedsgd(len(indices)):
        observation: Observation | UpdateObservation = observe(
            model, images.to(device), targets, batchnorm=run.batchnorm
        )
    else:
        if attack is not None and not isinstance(attack, InvertingGradients):
            raise ConfigError(
                f"{run.method} matches one gradient; a client running --local-steps "
                f"{run.local_steps} (or a --local-batch smaller than its batch) sends an "
                "update of several steps: use --method ig, which unrolls them"
            )
        observation = observe_update(
            model,
            images.to(device),
            targets,
            local_lr=run.local_lr,
            local_steps=run.local_steps,
            local_batch=run.local_batch,
            seed=client_seed,
            batchnorm=run.batchnorm,
            optimizer=run.optimizer,
        )

    method, reason = run.method, ""
    if attack is None:
        choice = choose_attack(observation, iterations=run.iterations, ig=_ig_config(run))
        attack, method, reason = choice.attack, choice.method, choice.reason
        observation = choice.observation
        log.info("--method auto picked %s", reason)
    if on_start is not None:
        # Inverting Gradients' bar counts the steps of every trial.
        trials = attack.config.restarts + 1 if isinstance(attack, InvertingGradients) else 1
        on_start(method, attack.config.iterations * trials, reason)

    start = time.perf_counter()
    known = targets if run.labels == "known" else None
    if known is not None and not isinstance(attack, InvertingGradients):
        raise ConfigError(
            "--labels known is for --method ig; iDLG reads the labels, DLG learns them"
        )
    if isinstance(attack, InvertingGradients):
        watched = _PsnrWatch(callback, on_psnr, images) if on_psnr is not None else callback
        result = attack(observation, seed=attack_seed, labels=known, callback=watched)
    else:
        result = attack(observation, seed=attack_seed, callback=callback)
    seconds = time.perf_counter() - start

    # Reconstruction order[i] is the one that belongs to original i.
    recovered = result.inputs.detach().cpu()
    order, per_image_mse = metrics.match_reconstructions(recovered, images)
    recovered = recovered[order]
    predicted = [int(result.labels[j]) for j in order]
    pairs = list(zip(recovered, images, strict=True))
    per_image_psnr = [metrics.psnr(r, o) for r, o in pairs]
    per_image_ssim = [metrics.ssim(r[None], o[None]) for r, o in pairs]
    row: dict[str, Any] = {
        "method": method,
        "chosen_by": "auto" if run.method == "auto" else "user",
        "choice": reason or None,
        "dataset": dataset.name,
        "index": indices[0],
        "model": run.model,
    }
    if len(indices) == 1:
        row |= {
            "true_label": labels[0],
            "predicted_label": predicted[0],
            "true_class": _class_name(dataset.class_names, labels[0]),
            "predicted_class": _class_name(dataset.class_names, predicted[0]),
        }
    row |= {
        "batch_size": len(indices),
        "indices": indices,
        "true_labels": labels,
        "predicted_labels": predicted,
        "label_correct": metrics.label_correct(predicted, labels),
        "labels_correct": metrics.label_correct(predicted, labels),
        "labels_given": run.labels == "known",
        "per_image_mse": [finite_or_none(m) for m in per_image_mse],
        "mse": finite_or_none(sum(per_image_mse) / len(per_image_mse)),
        "per_image_psnr": [finite_or_none(v) for v in per_image_psnr],
        "per_image_ssim": [finite_or_none(v) for v in per_image_ssim],
        "psnr": finite_or_none(_mean(per_image_psnr)),
        # Not PSNR: the truth fixes each channel's scale and shift first (BatchNorm hides them).
        "psnr_affine_corrected": finite_or_none(
            _mean(metrics.psnr_affine_corrected(r, o) for r, o in pairs)
        ),
        "ssim": finite_or_none(metrics.ssim(recovered, images)),
        "matching_loss": finite_or_none(result.final_loss),
        "converged": result.converged,
        "iterations": result.steps,
        "evaluations": result.evaluations,
        "restarts": result.restarts,
        "seconds": round(seconds, 3),
        "seed": run.seed,
        "improved": bool(getattr(attack.config, "improved", False)),
        "weights": run.weights,
        "shared": "gradient" if run.fedsgd(len(indices)) else "update",
        "local_steps": run.local_steps,
        "local_batch": run.local_batch or len(indices),
        "local_lr": run.local_lr,
        "optimizer": run.optimizer.to_json(),
        "normalize": run.normalize,
        "batchnorm": run.batchnorm,
        "device": str(device),
        "config": asdict(attack.config),
        "torch": torch.__version__,
    }
    write_json(out / "metrics.json", row)
    _save_reconstruction_strip(out / "reconstruction.png", images, result, order, row)
    log.info("wrote %s", out)
    return row


def _build_attack(run: AttackRun) -> GradientInversion | InvertingGradients | None:
    """DLG or iDLG (L-BFGS, 300 steps by default), Inverting Gradients (Adam), None for auto."""
    if run.method not in METHODS:
        raise ConfigError(f"unknown method '{run.method}': choose one of {', '.join(METHODS)}")
    if run.method == "auto":
        if run.improved:
            raise ConfigError("--improved is for dlg and idlg; auto picks its own attack")
        return None
    if run.method == "ig":
        if run.improved:
            raise ConfigError("--improved is for dlg and idlg; ig has its own optimiser")
        return InvertingGradients(_ig_config(run))
    config = AttackConfig(improved=run.improved)
    if run.iterations is not None:
        config = replace(config, iterations=run.iterations)
    return build_attack(run.method, config)


def _ig_config(run: AttackRun) -> IGConfig:
    """IG's config from its preset; ``--iterations`` forces that many steps (no plateau stop).

    About 8 frames on the strip (of the step cap: a run the plateau rule stops
    early shows fewer).
    """
    config = IGConfig.paper() if run.preset == "paper" else IGConfig()
    if run.preset == "default" and run.cores > 1:
        # One trial a core, the best kept.  Not the default: on the trained
        # MNIST ConvNet the best of two gave the same median and worst PSNR
        # as one trial, at up to twice the wall time (BENCHMARKS.md).
        config = replace(config, restarts=run.cores - 1, parallel=run.cores)
    if run.iterations is not None:
        config = replace(config, iterations=run.iterations, schedule="step")
    if run.tv_scale is not None:
        config = replace(config, tv_scale=run.tv_scale)
    return replace(config, snapshot_every=max(1, config.iterations // 8))


class _PsnrWatch:
    """A step callback that also shows the dummies' PSNR (matched to the victims) now and then."""

    def __init__(
        self, callback: StepCallback | None, on_psnr: PsnrCallback, truth: torch.Tensor
    ) -> None:
        self._callback = callback
        self._on_psnr = on_psnr
        self._truth = truth

    def __call__(self, step: int, loss: float) -> None:
        if self._callback is not None:
            self._callback(step, loss)

    def on_inputs(self, step: int, x: torch.Tensor) -> None:
        recovered = x.detach().cpu().to(self._truth.dtype)
        order, _ = metrics.match_reconstructions(recovered, self._truth)
        values = [metrics.psnr(recovered[j], self._truth[i]) for i, j in enumerate(order)]
        self._on_psnr(step, _mean(values))


def victim_indices(run: AttackRun, size: int, name: str) -> list[int]:
    """The victims' indices in a dataset of `size` images called `name`.

    `run.indices` if given (then `run.batch_size`, if given, must agree), else
    `run.batch_size` (default 1) consecutive images from `run.index`.

    Raises:
        ConfigError: No indices, repeated ones, or a batch size that disagrees.
        DataError: An index outside the dataset, or a batch running past its end.
    """
    last = f"{name} has {size:,} images (0..{size - 1})"
    if run.indices is None:
        batch = 1 if run.batch_size is None else run.batch_size
        if batch <= 0:
            raise ConfigError(f"--batch-size must be 1 or more, got {batch}")
        if 0 <= run.index < size < run.index + batch:
            raise DataError(
                f"a batch of {batch} from index {run.index} runs past the end: {last}; "
                "lower --index or --batch-size"
            )
        chosen = list(range(run.index, run.index + batch))
    else:
        chosen = list(run.indices)
        if not chosen:
            raise ConfigError("--indices is empty: give one or more, e.g. --indices 0,5,9")
        if run.batch_size is not None and run.batch_size != len(chosen):
            raise ConfigError(
                f"--batch-size {run.batch_size} disagrees with the {len(chosen)} --indices "
                "given; drop --batch-size"
            )
        repeated = sorted({i for i in chosen if chosen.count(i) > 1})
        if repeated:
            raise ConfigError(f"--indices repeats {repeated}: give each image once")
    for i in chosen:
        if not 0 <= i < size:
            raise DataError(f"index {i} is out of range: {last}")
    return chosen


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def _class_name(names: tuple[str, ...] | None, label: int) -> str | None:
    if names is None or not 0 <= label < len(names) or names[label] == str(label):
        return None  # no names, or names that only repeat the number (MNIST)
    return names[label]


def _save_reconstruction_strip(
    path: Path,
    originals: torch.Tensor,
    result: Reconstruction,
    order: list[int],
    row: dict[str, Any],
) -> None:
    # iDLG's Figure 2, one row per image: the original, the dummy every 10
    # steps, then the result; row i shows the reconstruction matched to image i.
    rows = []
    for i, j in enumerate(order):
        frames = [("original", originals[i])]
        frames += [
            (f"step {s.step}", s.inputs[j]) for s in result.snapshots if s.step < result.steps
        ]
        frames.append((f"final (step {result.steps})", result.inputs[j]))
        mse = row["per_image_mse"][i]
        rows.append(
            (
                f"[{row['indices'][i]}] {'diverged' if mse is None else f'{mse:.1e}'}",
                frames,
            )
        )
    mse = "diverged" if row["mse"] is None else f"{row['mse']:.2e}"
    if len(order) == 1:
        title = (
            f"{row['method'].upper()} on {row['dataset']}[{row['index']}]: label "
            f"{row['true_label']} -> {row['predicted_label']}, MSE {mse}"
        )
        save_strip(path, rows[0][1], title=title)
        return
    title = (
        f"{row['method'].upper()} on a batch of {len(order)} from {row['dataset']}: labels "
        f"{sorted(row['true_labels'])} -> {sorted(row['predicted_labels'])}, mean MSE {mse}"
    )
    save_strip_rows(path, rows, title=title)
