"""The iDLG paper's experiment protocol: one experiment, one victim, one line.

The protocol of the iDLG paper's public code: per experiment a fresh LeNet
(every weight and bias uniform in [-0.5, 0.5]), one image drawn uniformly
from the dataset, one shared gradient, and both DLG and iDLG attacking that
same gradient.

Seeds: experiment ``e`` of dataset ``d`` (its position in `DATASETS`) under
the user's seed ``s`` takes four independent streams from
``numpy.random.SeedSequence([s, d, e]).spawn(4)``: the model init, the
image index, DLG's dummy init and iDLG's dummy init.  So one experiment's
numbers depend on nothing else in the run (not the chunk size, not the
order, not what ran before a resume), and the two attacks start from
different dummies, as two independent attackers would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradleak import metrics
from gradleak.data import ImageDataset
from gradleak.experiments.common import finite_or_none
from gradleak.models import build_model
from gradleak.threat import observe
from gradleak.types import Observation, Reconstruction

DATASETS = ("mnist", "cifar100", "lfw")
METHODS = ("dlg", "idlg")
MODEL = "lenet"
SEEDING = (
    "numpy SeedSequence([seed, dataset_id, experiment]).spawn(4) -> model, image index, "
    "dlg, idlg; dataset_id = position in " + ",".join(DATASETS)
)


@dataclass(frozen=True)
class ExperimentSeeds:
    """The independent seeds of one experiment (see the module docstring)."""

    model: int
    index: int
    attacks: dict[str, int]


@dataclass(frozen=True)
class Victim:
    """One experiment's private example and the gradient it shared."""

    experiment: int
    image_index: int
    image: torch.Tensor
    label: int
    observation: Observation
    seeds: ExperimentSeeds


def experiment_seeds(seed: int, dataset: str, experiment: int) -> ExperimentSeeds:
    """Seeds of experiment `experiment` of `dataset` under the run's `seed`."""
    streams = np.random.SeedSequence([seed, DATASETS.index(dataset), experiment]).spawn(4)
    model, index, dlg, idlg = (int(s.generate_state(1)[0]) for s in streams)
    return ExperimentSeeds(model=model, index=index, attacks={"dlg": dlg, "idlg": idlg})


def make_victim(
    data: ImageDataset, dataset: str, seed: int, experiment: int, device: torch.device
) -> Victim:
    """Build experiment `experiment`: a fresh LeNet, a random image, its gradient."""
    seeds = experiment_seeds(seed, dataset, experiment)
    index = int(np.random.default_rng(seeds.index).integers(len(data)))
    image, label = data[index]
    model = build_model(
        MODEL, input_shape=data.shape, num_classes=data.num_classes, seed=seeds.model
    ).to(device)
    observation = observe(model, image.to(device), torch.tensor(label))
    return Victim(experiment, index, image, label, observation, seeds)


def result_row(
    victim: Victim,
    method: str,
    dataset: str,
    result: Reconstruction,
    seconds: float,
    engine: str,
    device: torch.device,
) -> dict[str, Any]:
    """One line of results.jsonl."""
    predicted = int(result.labels[0])
    recovered = result.inputs[0].detach().cpu()
    return {
        "experiment": victim.experiment,
        "method": method,
        "dataset": dataset,
        "image_index": victim.image_index,
        "true_label": victim.label,
        "predicted_label": predicted,
        "label_correct": metrics.label_correct(predicted, victim.label),
        "mse": finite_or_none(metrics.mse(recovered, victim.image)),
        "psnr": finite_or_none(metrics.psnr(recovered, victim.image)),
        "ssim": finite_or_none(metrics.ssim(recovered, victim.image)),
        "iterations": result.steps,
        "evaluations": result.evaluations,
        "restarts": result.restarts,
        "converged": result.converged,
        "seconds": round(seconds, 4),
        "engine": engine,
        "device": str(device),
    }
