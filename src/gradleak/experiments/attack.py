"""`gradleak attack`: one victim, one shared gradient, one reconstruction."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gradleak import metrics
from gradleak.attacks import AttackConfig, StepCallback, build_attack
from gradleak.data import load_dataset
from gradleak.errors import ConfigError
from gradleak.experiments.common import (
    derive_seeds,
    finite_or_none,
    resolve_device,
    use_cpu_threads,
    write_json,
)
from gradleak.models import MODELS, build_model
from gradleak.report import save_strip
from gradleak.threat import observe
from gradleak.types import Reconstruction

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttackRun:
    """One `gradleak attack` invocation."""

    method: str = "idlg"
    dataset: str = "sample"
    data_dir: str | None = None
    index: int = 0
    model: str = "lenet"
    iterations: int = 300
    seed: int = 0
    improved: bool = False
    device: str = "auto"
    out: str = "runs/attack"
    num_classes: int | None = None


def run_attack(run: AttackRun, *, callback: StepCallback | None = None) -> dict[str, Any]:
    """Simulate the victim, attack its gradient, write metrics.json and the strip.

    Returns:
        The metrics written to ``<out>/metrics.json``.
    """
    if run.model not in MODELS:
        raise ConfigError(f"unknown model '{run.model}': choose one of {', '.join(MODELS)}")
    attack = build_attack(
        run.method, AttackConfig(iterations=run.iterations, improved=run.improved)
    )
    device = resolve_device(run.device)
    use_cpu_threads(device)
    dataset = load_dataset(run.dataset, data_dir=run.data_dir, num_classes=run.num_classes)
    image, label = dataset[run.index]
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)

    model_seed, attack_seed = derive_seeds(run.seed, 2)
    model = build_model(
        run.model, input_shape=dataset.shape, num_classes=dataset.num_classes, seed=model_seed
    ).to(device)
    x = image.to(device)
    observation = observe(model, x, torch.tensor(label))

    start = time.perf_counter()
    result = attack(observation, seed=attack_seed, callback=callback)
    seconds = time.perf_counter() - start

    predicted = int(result.labels[0])
    recovered = result.inputs[0].cpu()
    row = {
        "method": run.method,
        "dataset": dataset.name,
        "index": run.index,
        "model": run.model,
        "true_label": label,
        "predicted_label": predicted,
        "true_class": _class_name(dataset.class_names, label),
        "predicted_class": _class_name(dataset.class_names, predicted),
        "label_correct": metrics.label_correct(predicted, label),
        "mse": finite_or_none(metrics.mse(recovered, image)),
        "psnr": finite_or_none(metrics.psnr(recovered, image)),
        "ssim": finite_or_none(metrics.ssim(recovered, image)),
        "matching_loss": finite_or_none(result.final_loss),
        "converged": result.converged,
        "iterations": result.steps,
        "evaluations": result.evaluations,
        "restarts": result.restarts,
        "seconds": round(seconds, 3),
        "seed": run.seed,
        "improved": run.improved,
        "device": str(device),
        "config": asdict(attack.config),
        "torch": torch.__version__,
    }
    write_json(out / "metrics.json", row)
    _save_reconstruction_strip(out / "reconstruction.png", image, result, row)
    log.info("wrote %s", out)
    return row


def _class_name(names: tuple[str, ...] | None, label: int) -> str | None:
    if names is None or not 0 <= label < len(names) or names[label] == str(label):
        return None  # no names, or names that only repeat the number (MNIST)
    return names[label]


def _save_reconstruction_strip(
    path: Path, original: torch.Tensor, result: Reconstruction, row: dict[str, Any]
) -> None:
    # iDLG's Figure 2: the original, then the dummy every 10 steps, then the result.
    frames = [("original", original)]
    frames += [(f"step {s.step}", s.inputs[0]) for s in result.snapshots if s.step < result.steps]
    frames.append((f"final (step {result.steps})", result.inputs[0]))
    mse = "diverged" if row["mse"] is None else f"{row['mse']:.2e}"
    title = (
        f"{row['method'].upper()} on {row['dataset']}[{row['index']}]: label "
        f"{row['true_label']} -> {row['predicted_label']}, MSE {mse}"
    )
    save_strip(path, frames, title=title)
