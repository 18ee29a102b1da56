"""What `gradleak reproduce ig` makes of its results: summary.json, strips, report.md.

Computed from the lines of results.jsonl alone (and the trained models'
headers), so the summary agrees with them whatever mix of runs and resumes
wrote them.  The peers' published figures are data here, in `PEERS`, each
row of our table set beside the nearest of them with what differs.
"""

from __future__ import annotations

import io
import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradleak import report
from gradleak.experiments.common import DATASET_NAMES, source_text, write_json
from gradleak.metrics import match_reconstructions
from gradleak.sweep.store import RUN
from gradleak.types import Reconstruction

STRIP_EXPERIMENT = 0  # the experiment whose reconstructions the strips show
OURS_ATTACK = "Inverting Gradients"


@dataclass(frozen=True)
class Peer:
    """One published figure (breaching's example notebooks, as /work/shared/PAPERS.md lists them).

    Attributes:
        name: Short name in the table.
        attack: The attack.
        model: The network.
        trained: Whether the network was trained (None: not stated).
        dataset: Where the images come from.
        batch_size: Images per client.
        local_steps: Local steps (1: one gradient, FedSGD).
        labels: "given", "inferred" or how else the attack had them.
        iterations: Optimiser steps (None: not stated).
        tv_scale: Total-variation weight (None: not stated / no prior).
        psnr: Published PSNR, dB.
        ssim: Published SSIM (None: not given).
        source: Where the figure is.
        note: Anything else the figure comes with.
        batchnorm: The clients' BatchNorm mode: breaching's honest-but-curious
            server sends its running statistics ("public buffers") and the
            user then computes in eval mode.
    """

    name: str
    attack: str
    model: str
    trained: bool | None
    dataset: str
    batch_size: int
    local_steps: int
    labels: str
    iterations: int | None
    tv_scale: float | None
    psnr: float
    ssim: float | None
    source: str
    note: str = ""
    batchnorm: str = "eval"


_NOTEBOOKS = "breaching (JonasGeiping/breaching) examples/"
# Single runs from breaching's example notebooks, their saved outputs (PAPERS.md,
# "Peers' published figures"); the settings are the notebooks' printed configurations.
PEERS: tuple[Peer, ...] = (
    Peer(
        name="breaching FedAvg",
        attack=OURS_ATTACK,
        model="ResNet-18",
        trained=True,
        dataset="CIFAR-10",
        batch_size=4,
        local_steps=4,
        labels="given",
        iterations=24_000,
        tv_scale=1e-3,
        psnr=20.8,
        ssim=0.75,
        source=_NOTEBOOKS + "Inverting Gradients - Optimization-based Attack - ResNet18 on "
        "CIFAR10 - Federated Averaging.ipynb",
        note="4 local steps of 2 images, local lr 0.001",
    ),
    Peer(
        name="breaching IG, ImageNet",
        attack=OURS_ATTACK,
        model="ResNet-18",
        trained=True,
        dataset="ImageNet",
        batch_size=1,
        local_steps=1,
        labels="inferred",
        iterations=24_000,
        tv_scale=0.2,
        psnr=14.2,
        ssim=0.40,
        source=_NOTEBOOKS + "Inverting Gradients - Optimization-based Attack - ResNet18 on "
        "ImageNet.ipynb",
        note="224x224 images",
    ),
    Peer(
        name="breaching IG, large batch",
        attack=OURS_ATTACK,
        model="ResNet32-10",
        trained=False,
        dataset="CIFAR-100",
        batch_size=100,
        local_steps=1,
        labels="inferred",
        iterations=24_000,
        tv_scale=5e-4,
        psnr=11.2,
        ssim=0.38,
        source=_NOTEBOOKS + "Inverting Gradients - Optimization-based Attack - Large Batch "
        "CIFAR-100.ipynb",
        note="100 distinct labels",
    ),
    Peer(
        name="breaching DLG",
        attack="DLG",
        model="ConvNet",
        trained=None,
        dataset="CIFAR-10",
        batch_size=1,
        local_steps=1,
        labels="learned (wrong)",
        iterations=None,
        tv_scale=None,
        psnr=23.4,
        ssim=0.88,
        source=_NOTEBOOKS + "Deep Leakage from Gradients - Optimization-based Attack - ConvNet "
        "CIFAR-10.ipynb",
        note="the label came out wrong",
    ),
)


def nearest_peer(weights: str, batch_size: int, local_steps: int) -> tuple[Peer, bool]:
    """The published figure nearest a cell, and whether it has the same B and K.

    Nearest, in this order: the same kind of sharing (one gradient, K = 1, or
    an update of several steps), the same kind of batch (one image or
    several), the batch size nearest on a log scale, weights that do not
    contradict ours (trained or not, where stated), Inverting Gradients
    before DLG.
    """

    def distance(peer: Peer) -> tuple:
        return (
            (peer.local_steps > 1) != (local_steps > 1),
            (peer.batch_size > 1) != (batch_size > 1),
            abs(math.log2(peer.batch_size) - math.log2(batch_size)),
            peer.trained is not None and peer.trained != (weights == "trained"),
            peer.attack != OURS_ATTACK,
        )

    peer = min(PEERS, key=distance)
    return peer, peer.batch_size == batch_size and peer.local_steps == local_steps


def differences(peer: Peer, weights: str, batch_size: int, local_steps: int,
                context: Mapping[str, Any], dataset: str) -> list[str]:  # fmt: skip
    """What the peer's setting has that ours does not (our side is the table's row)."""
    said: list[str] = []
    if peer.attack != OURS_ATTACK:
        said.append(f"attack {peer.attack}")
    said.append(f"model {peer.model}")
    if peer.trained is None:
        said.append("weights not stated")
    elif peer.trained != (weights == "trained"):
        said.append("trained" if peer.trained else "untrained")
    if peer.dataset != DATASET_NAMES.get(dataset, dataset):
        said.append(peer.dataset)
    if peer.batch_size != batch_size:
        said.append(f"{peer.batch_size} images")
    if peer.local_steps != local_steps:
        said.append(f"{peer.local_steps} local steps")
    if peer.labels != "inferred":
        said.append(f"labels {peer.labels}")
    if peer.iterations is None:
        said.append("iterations not stated")
    elif peer.iterations != context.get("iterations"):
        said.append(f"{peer.iterations:,} iterations")
    if peer.tv_scale is not None and peer.tv_scale != context.get("tv_scale"):
        said.append(f"TV {peer.tv_scale:g}")
    if peer.batchnorm != context.get("batchnorm", "eval"):
        said.append(f"BatchNorm in {peer.batchnorm} mode")
    return said


# --------------------------------------------------------------------------
# The summary


def summarise(
    rows: Sequence[Mapping[str, Any]],
    run: Any,
    trained: Mapping[str, Mapping[str, Any]],
    **context: Any,
) -> dict[str, Any]:
    """Per dataset, one entry per (weights, B, K): PSNR, SSIM, labels, the nearest peer.

    Args:
        rows: results.jsonl's lines.
        run: The `IGRun` (its datasets, weights, batch sizes, local steps, experiments).
        trained: Per dataset, what `run.prepare_trained` says of its trained model.
        context: Settings and timings to keep in the summary.
    """
    tables: dict[str, list[dict[str, Any]]] = {}
    for dataset in run.datasets:
        entries = []
        for weights in run.weights:
            for size in run.batch_sizes:
                for steps in run.local_steps:
                    mine = [
                        r
                        for r in rows
                        if r["dataset"] == dataset
                        and r["weights"] == weights
                        and r["batch_size"] == size
                        and r["local_steps"] == steps
                        and r["experiment"] < run.experiments
                    ]
                    peer, same = nearest_peer(weights, size, steps)
                    entries.append(
                        {
                            "weights": weights,
                            "batch_size": size,
                            "local_steps": steps,
                            "local_batch": mine[0]["local_batch"] if mine else None,
                            **_stats(mine),
                            "peer": {
                                "name": peer.name,
                                "psnr": peer.psnr,
                                "ssim": peer.ssim,
                                "same_batch_and_steps": same,
                                "differs": differences(
                                    peer, weights, size, steps, context, dataset
                                ),
                            },
                        }
                    )
        tables[dataset] = entries
    return {
        **context,
        "datasets": list(run.datasets),
        "weights": list(run.weights),
        "batch_sizes": list(run.batch_sizes),
        "local_steps": list(run.local_steps),
        "experiments": run.experiments,
        "attack_seconds": round(sum(r["seconds"] for r in rows), 3),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "trained": {name: dict(info) for name, info in trained.items()},
        "tables": tables,
        "peers": [asdict(p) for p in PEERS],
    }


def _stats(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    psnrs = [v for r in rows for v in r["per_image_psnr"] if v is not None]
    ssims = [v for r in rows for v in r["per_image_ssim"] if v is not None]
    return {
        "experiments": len(rows),
        "images": sum(int(r["batch_size"]) for r in rows),
        "failed": sum(1 for r in rows if r.get("error")),
        "psnr": _centre(psnrs),
        "ssim": _centre(ssims),
        "labels_exact": _share([r["labels_exact"] for r in rows]),
        "labels_matched": _share([r["labels_matched"] for r in rows]),
        "matching_loss": _centre(
            [r["matching_loss"] for r in rows if r["matching_loss"] is not None]
        ),
        "seconds": _centre([r["seconds"] for r in rows]),
    }


def _centre(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None}
    return {"mean": statistics.fmean(values), "median": float(statistics.median(values))}


def _share(flags: Sequence[bool]) -> float | None:
    return sum(1 for f in flags if f) / len(flags) if flags else None


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """Write summary.json atomically."""
    write_json(out / "summary.json", summary)


# --------------------------------------------------------------------------
# Strips


def strip_name(cell: Sequence[Any]) -> str:
    """The file keeping a cell's experiment-0 frames: strip-<dataset>-<weights>-b<B>-k<K>.npz."""
    dataset, weights, size, steps = cell
    return f"strip-{dataset}-{weights}-b{size}-k{steps}.npz"


def strip_frames(originals: torch.Tensor, result: Reconstruction, row: Mapping[str, Any]) -> bytes:
    """A strip file's contents: the originals, the matched reconstructions, their PSNR."""
    permutation, _ = match_reconstructions(result.inputs.detach().cpu(), originals)
    matched = result.inputs.detach().cpu()[permutation].float().numpy()
    psnr = np.array([np.nan if v is None else v for v in row["per_image_psnr"]], dtype=float)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, originals=originals.float().numpy(), matched=matched, psnr=psnr)
    return buffer.getvalue()


def strip_file(dataset: str) -> str:
    return f"strip-{dataset}.png"


def _strip_rows(out: Path, summary: Mapping[str, Any], dataset: str) -> list[tuple[str, list]]:
    """One originals row per B (the same images in every cell of that B), then each cell's."""
    rows: list[tuple[str, list]] = []
    for size in summary["batch_sizes"]:
        originals_shown = False
        for weights in summary["weights"]:
            for steps in summary["local_steps"]:
                path = out / strip_name((dataset, weights, size, steps))
                if not path.exists():
                    continue
                with np.load(path) as saved:
                    originals, matched, psnr = saved["originals"], saved["matched"], saved["psnr"]
                if not originals_shown:
                    frames = [("", torch.from_numpy(o)) for o in originals]
                    rows.append((f"B={size} originals", frames))
                    originals_shown = True
                frames = [
                    ("n/a" if np.isnan(p) else f"{p:.1f} dB", torch.from_numpy(m))
                    for m, p in zip(matched, psnr, strict=True)
                ]
                rows.append((f"{weights} K={steps}", frames))
    return rows


# --------------------------------------------------------------------------
# report.md


def _batchnorm_text(mode: str) -> str:
    if mode == "eval":
        return (
            "eval mode on the client: the server's running statistics, breaching's public "
            "buffers, as in the paper's code and the peers' figures"
        )
    return (
        "train mode on the client: the batch's own statistics, as model.train(); the peers' "
        "figures are in eval mode"
    )


def write_report(out: Path, summary: Mapping[str, Any]) -> None:
    """Write the strips (where frames exist) and report.md."""
    sizes = _dataset_sizes(out)
    iterations, paper = summary["iterations"], summary["paper_iterations"]
    lines = [
        "# Inverting Gradients, in the manner of Geiping et al. (NeurIPS 2020)",
        "",
        f"- command: `{summary['command']}`",
        f"- model: {summary['model']} width {summary['width']} (ReLU + BatchNorm, "
        + _batchnorm_text(summary.get("batchnorm", "eval"))
        + "); untrained: a fresh seeded model per experiment; trained: one model per "
        "dataset, trained by this run (below)",
        f"- attack: Inverting Gradients, cosine distance + total variation (scale "
        f"{summary['tv_scale']:g}), signed Adam 0.1 with step decay, boxed pixels, one trial, "
        f"**{iterations:,} iterations** (the paper: {paper:,}; "
        + ("fewer, so these are short runs of the attack" if iterations < paper else "as many")
        + "); labels inferred from the gradient or update, never given",
        "- client: K = 1 shares the gradient of its whole batch (FedSGD); K > 1 runs K steps of "
        f"SGD (lr {summary['local_lr']:g}) on mini-batches of max(1, B // 2) images and sends "
        "the update (FedAvg)",
    ]
    for dataset in summary["datasets"]:
        size = sizes.get(dataset)
        pool = None if size is None else size - int(0.8 * size)
        held = "" if pool is None else f" ({pool:,} images)"
        lines.append(
            f"- data, {dataset}: {source_text(dataset, size)}, from the held-out 20% of a "
            f"seeded 80/20 split{held}; the trained model learns from the other 80%"
        )
    for dataset, info in summary["trained"].items():
        epochs = f"{info['epochs']} epoch{'s' if info['epochs'] != 1 else ''}"
        lines.append(
            f"- trained {dataset} model ({info['file']}): {epochs} of {info['optimizer']} (lr "
            f"{info['lr']:g}) on {info['train_images']:,} images; test accuracy "
            f"**{100 * info['test_accuracy']:.2f}%** ({info['test_correct']:,} of "
            f"{info['test_images']:,}) on the other 20%; split: {info['split']}"
        )
    lines += [
        f"- N = {summary['experiments']} experiments per cell, seed {summary['seed']}, device "
        f"{summary['device']}, {summary['executor']}; seeding: {summary['seeding']}",
        f"- time: {summary['attack_seconds']:.1f} s of attacks over all runs of this folder; this "
        f"run's wall time {summary['wall_seconds']:.1f} s",
        f"- gradleak {summary['gradleak']}, torch {summary['torch']}; results: "
        "[results.jsonl](results.jsonl), [summary.json](summary.json)",
        "",
        "PSNR and SSIM: over every image of the cell, each matched to its reconstruction by "
        "optimal assignment on MSE. Labels exact: share of experiments whose inferred label "
        "multiset is the true one. Peer: the nearest published figure (same B and K, or "
        "nearest), with what its setting has that ours does not.",
    ]
    for dataset in summary["datasets"]:
        lines += ["", f"## {DATASET_NAMES.get(dataset, dataset)}", ""]
        lines += [
            "| weights | B | K | N | PSNR mean (dB) | PSNR median | SSIM mean | labels exact "
            "| s / attack | peer PSNR / SSIM | peer, and what differs |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for entry in summary["tables"][dataset]:
            peer = entry["peer"]
            kind = "same B, K" if peer["same_batch_and_steps"] else "nearest"
            ssim = "n/a" if peer["ssim"] is None else f"{peer['ssim']:.2f}"
            lines.append(
                "| "
                + " | ".join(
                    [
                        entry["weights"],
                        str(entry["batch_size"]),
                        str(entry["local_steps"]),
                        str(entry["experiments"]),
                        _num(entry["psnr"]["mean"], ".1f"),
                        _num(entry["psnr"]["median"], ".1f"),
                        _num(entry["ssim"]["mean"], ".2f"),
                        _pct(entry["labels_exact"]),
                        _num(entry["seconds"]["mean"], ".1f"),
                        f"{peer['psnr']:.1f} / {ssim}",
                        f"{peer['name']} ({kind}): " + ", ".join(peer["differs"]),
                    ]
                )
                + " |"
            )
        strip = _strip_rows(out, summary, dataset)
        if strip:
            report.save_strip_rows(
                out / strip_file(dataset),
                strip,
                title=f"{dataset}, experiment {STRIP_EXPERIMENT}\n(PSNR per image)",
            )
            lines += ["", f"![{dataset} strip]({strip_file(dataset)})"]
    lines += [
        "",
        "## The peers' figures",
        "",
        "Single runs from breaching's example notebooks (their saved outputs), not a benchmark.",
        "",
        "| peer | attack | model | weights | dataset | B | K | labels | iterations | TV | PSNR "
        "| SSIM | note | source |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in summary["peers"]:
        weights = {True: "trained", False: "untrained", None: "not stated"}[p["trained"]]
        cells = [
            p["name"],
            p["attack"],
            p["model"],
            weights,
            p["dataset"],
            str(p["batch_size"]),
            str(p["local_steps"]),
            p["labels"],
            "n/a" if p["iterations"] is None else f"{p['iterations']:,}",
            "n/a" if p["tv_scale"] is None else f"{p['tv_scale']:g}",
            f"{p['psnr']:.1f}",
            "n/a" if p["ssim"] is None else f"{p['ssim']:.2f}",
            p["note"],
            f"`{p['source'].split('/')[-1]}`",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _dataset_sizes(out: Path) -> dict[str, int]:
    try:
        pinned = json.loads((out / RUN).read_text())
    except (OSError, ValueError):
        return {}
    return dict(pinned.get("dataset_sizes") or {})


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}%"


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
