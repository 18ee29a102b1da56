"""Where the line lies: from how many examples a client's images stop coming back.

An audited client with hundreds of examples gives back its label histogram
and no recognisable image; the operator's question is then how far that is
from leaking.  `find_line` answers it for the app's own model, weights and
schedule: it makes synthetic clients of n = 1, 2, 4, ... examples drawn from
data the user gives (their own or a stand-in), trains each as the real
clients train (the round's sent weights, the schedule and optimiser the audit
used, BatchNorm in train mode), attacks its update with the audit's attack,
and reports the share of images recognisable (PSNR >= 20 dB or SSIM >= 0.6,
the report's bar) at each n.  The line is the largest n at which at least
half of the images come back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradleak import metrics
from gradleak.data import load_dataset
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.experiments.audit.choose import choose_attack
from gradleak.experiments.audit.load import Target
from gradleak.threat import observe_update
from gradleak.types import Observation, UpdateObservation

SIZES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class LinePoint:
    """One client size of the sweep: its clients' images and how many came back."""

    examples: int
    clients: int
    recognisable: int
    psnr: float
    seconds: float

    @property
    def share(self) -> float:
        return self.recognisable / (self.examples * self.clients)

    def to_json(self) -> dict[str, Any]:
        return {
            "examples": self.examples, "clients": self.clients,
            "recognisable": self.recognisable, "share": self.share,
            "psnr": None if math.isnan(self.psnr) else self.psnr, "seconds": self.seconds,
        }  # fmt: skip


def find_line(
    target: Target,
    dataset: str,
    *,
    data_dir: str | None,
    sizes: Sequence[int] = SIZES,
    clients: int = 2,
    method: str = "auto",
    iterations: int | None = None,
    tv_scale: float = 1e-3,
    seed: int = 0,
    psnr_bar: float = 20.0,
    ssim_bar: float = 0.6,
    callback: Callable[[str, float, int], None] | None = None,
) -> list[LinePoint]:
    """Attack synthetic clients of each size in `sizes` trained like `target`'s client.

    Raises:
        ConfigError: Unknown data, or data with more classes than the model.
        DataError: Data files missing or corrupt.
    """
    observation = target.observation
    model = observation.model
    data = load_dataset(dataset, data_dir=data_dir, shape=observation.input_shape)
    if int(data.labels.max()) >= observation.num_classes:
        raise ConfigError(
            f"{dataset} has labels up to {int(data.labels.max())}, the model "
            f"{observation.num_classes} classes; give data of the model's classes"
        )
    optimizer = getattr(observation, "optimizer", None)
    drop_last = bool(getattr(observation, "drop_last", False))
    rng = np.random.default_rng(seed)
    points: list[LinePoint] = []
    total = len(sizes) * clients
    done = 0
    for n in sizes:
        recognisable, psnrs, seconds = 0, [], 0.0
        for k in range(clients):
            picks = rng.choice(len(data), size=n, replace=False)
            x = torch.stack([data[int(i)][0] for i in picks])
            y = torch.tensor([data.label(int(i)) for i in picks])
            batch = target.local_batch if target.local_batch and target.local_batch < n else None
            if drop_last and batch is None and target.local_batch and target.local_batch > n:
                batch = n  # a loader that drops short batches still trains a client this small
            update = observe_update(
                model, x, y, local_lr=target.lr, local_steps=target.local_steps,
                epochs=target.epochs, local_batch=batch, seed=seed + 1000 * n + k,
                optimizer=optimizer, drop_last=drop_last and batch is not None,
            )  # fmt: skip
            started = time.perf_counter()
            try:
                attack, shown = _attack(update, method, iterations, tv_scale)
                result = attack(shown, seed=seed + k)
            except AttackNotApplicable:
                done += 1
                continue
            seconds += time.perf_counter() - started
            recovered = result.inputs.detach().cpu().float()
            order, _ = metrics.match_reconstructions(recovered, x)
            for r, o in zip(recovered[order], x, strict=True):
                p, s = metrics.psnr(r, o), metrics.ssim(r[None], o[None])
                psnrs.append(p)
                recognisable += int((math.isfinite(p) and p >= psnr_bar) or s >= ssim_bar)
            done += 1
            if callback is not None:
                callback("where images come back", done, total)
        finite = [p for p in psnrs if math.isfinite(p)]
        points.append(LinePoint(n, clients, recognisable, float(np.mean(finite)) if finite
                                else float("nan"), round(seconds, 2)))  # fmt: skip
    return points


def _attack(
    update: UpdateObservation, method: str, iterations: int | None, tv_scale: float
) -> tuple[Any, Observation | UpdateObservation]:
    choice = choose_attack(
        update, method=method, clipped=False, iterations=iterations, tv_scale=tv_scale
    )
    return choice.attack, choice.observation


def line(points: Sequence[LinePoint]) -> int | None:
    """The largest client size at which at least half of the images came back, or None."""
    sizes = [p.examples for p in points if p.share >= 0.5]
    return max(sizes) if sizes else None


__all__ = ["SIZES", "LinePoint", "find_line", "line"]
