"""One victim of `gradleak defend` and what the attacker sees of it under a defense.

An experiment is iDLG's protocol: a fresh uniform-init LeNet and a random
image, the same model and image under every defense, so the defenses are
compared on the same victims.  Defenses that mix several examples
(aggregation over k clients, a batch of B) use k - 1 more images of the same
experiment; the attacker, holding only the mean gradient, runs the
single-example attack on it and is scored against whichever private image
its result is closest to.

Seeds: experiment ``e`` under the run's seed ``s`` takes five independent
streams from ``numpy.random.SeedSequence([s, e]).spawn(5)``: the model init,
the images, DLG's and iDLG's dummy init, and the defense's noise.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradleak import metrics
from gradleak.data import ImageDataset
from gradleak.defenses import build_defense
from gradleak.experiments.common import finite_or_none
from gradleak.models import build_model
from gradleak.threat import observe_aggregate
from gradleak.types import Observation, Reconstruction

SEEDING = "numpy SeedSequence([seed, experiment]).spawn(5) -> model, images, dlg, idlg, defense"

Config = tuple[str, float | None]  # (defense, strength)


@dataclass(frozen=True)
class Experiment:
    """One victim: its model and private images (the first is the target)."""

    index: int
    model: torch.nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    image_indices: tuple[int, ...]
    seeds: dict[str, int]


def make_experiment(
    data: ImageDataset, seed: int, experiment: int, examples: int, device: torch.device
) -> Experiment:
    """Experiment `experiment`: a fresh LeNet and `examples` distinct random images."""
    streams = np.random.SeedSequence([seed, experiment]).spawn(5)
    model_seed, image_seed, dlg, idlg, defense = (int(s.generate_state(1)[0]) for s in streams)
    rng = np.random.default_rng(image_seed)
    indices: list[int] = []
    while len(indices) < min(examples, len(data)):  # the first draw never depends on `examples`
        i = int(rng.integers(len(data)))
        if i not in indices:
            indices.append(i)
    pairs = [data[i] for i in indices]
    model = build_model(
        "lenet", input_shape=data.shape, num_classes=data.num_classes, seed=model_seed
    ).to(device)
    return Experiment(
        index=experiment,
        model=model,
        images=torch.stack([image for image, _ in pairs]).to(device),
        labels=torch.tensor([label for _, label in pairs], device=device),
        image_indices=tuple(indices),
        seeds={"dlg": dlg, "idlg": idlg, "defense": defense},
    )


def examples_mixed(config: Config) -> int:
    defense = build_defense(*config)
    return defense.clients * defense.examples


def attacker_view(experiment: Experiment, config: Config) -> tuple[Observation, int]:
    """The attacker's view of the defended step, and how many examples it mixes."""
    defense = build_defense(*config, seed=experiment.seeds["defense"])
    n, per = defense.clients * defense.examples, defense.examples
    x, y = experiment.images[:n], experiment.labels[:n]
    clients = [
        (x[i * per : (i + 1) * per], y[i * per : (i + 1) * per]) for i in range(defense.clients)
    ]
    observation = observe_aggregate(
        experiment.model, clients, defense=defense.transform, step=defense.step
    )
    # The single-example attack treats the mean as one example's gradient.
    return dataclasses.replace(observation, batch_size=1), n


def result_row(
    config: Config,
    experiment: Experiment,
    mixed: int,
    method: str,
    result: Reconstruction,
    seconds: float,
) -> dict[str, Any]:
    """One line of results.jsonl, scored against the closest of the mixed images."""
    recovered = result.inputs[0].detach().cpu()
    images = experiment.images[:mixed].cpu()
    errors = [metrics.mse(recovered, image) for image in images]
    closest = int(np.nanargmin(errors)) if any(np.isfinite(errors)) else 0
    truth, true_label = images[closest], int(experiment.labels[closest])
    predicted = int(result.labels[0])
    return {
        "defense": config[0],
        "strength": config[1],
        "experiment": experiment.index,
        "method": method,
        "mse": finite_or_none(errors[closest]),
        "label_correct": metrics.label_correct(predicted, true_label),
        "psnr": finite_or_none(metrics.psnr(recovered, truth)),
        "ssim": finite_or_none(metrics.ssim(recovered, truth)),
        "true_label": true_label,
        "predicted_label": predicted,
        "image_index": experiment.image_indices[closest],
        "examples_mixed": mixed,
        "iterations": result.steps,
        "evaluations": result.evaluations,
        "converged": result.converged,
        "seconds": round(seconds, 4),
    }
