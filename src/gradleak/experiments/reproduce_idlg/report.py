"""What `gradleak reproduce idlg` makes of its results: summary, plots, markdown.

Everything here is computed from the lines of results.jsonl alone, so the
summary always agrees with them, whatever mix of runs and resumes wrote them.
"""

from __future__ import annotations

import io
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradleak import report
from gradleak.experiments.common import data_source, write_json
from gradleak.experiments.reproduce_idlg import paper
from gradleak.metrics import FIDELITY_THRESHOLDS, fidelity
from gradleak.types import Reconstruction

METHODS = ("dlg", "idlg")
LABELS = {"dlg": "DLG", "idlg": "iDLG"}
NAMES = {"mnist": "MNIST", "cifar100": "CIFAR-100", "lfw": "LFW"}
STRIP_EXPERIMENT = 0  # the experiment whose optimisation strip.png shows
STRIP_FRAMES = 16  # frames per row at most, so the figure stays readable


def threshold_key(threshold: float) -> str:
    """How a fidelity threshold is written as a JSON key ("0.001")."""
    return f"{threshold:g}"


def summarise(rows: Sequence[Mapping[str, Any]], *, experiments: int, **context: Any) -> dict:
    """Summary of the first `experiments` experiments, from results lines only.

    Args:
        rows: Lines of results.jsonl (one per experiment and method).
        experiments: Count only experiments ``0 .. experiments - 1``.
        **context: Description of the run, copied into the summary.
    """
    kept = [r for r in rows if r["experiment"] < experiments]
    per_method = {m: [r for r in kept if r["method"] == m] for m in METHODS}
    complete = set.intersection(*({r["experiment"] for r in rs} for rs in per_method.values()))
    return {
        **context,
        "experiments": experiments,
        "complete": len(complete),
        "attack_seconds": round(sum(r["seconds"] for r in kept), 3),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "thresholds": list(FIDELITY_THRESHOLDS),
        "methods": {m: _method_summary(rs) for m, rs in per_method.items()},
        "paper_values": _paper_values(context.get("dataset", "")),
    }


def _method_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    mses = [math.nan if r["mse"] is None else r["mse"] for r in rows]
    shares = fidelity(mses)
    correct = sum(1 for r in rows if r["label_correct"])
    return {
        "experiments": len(rows),
        "label_correct": correct,
        "label_accuracy": correct / len(rows) if rows else None,
        "fidelity": {threshold_key(t): (None if math.isnan(v) else v) for t, v in shares.items()},
        "diverged": sum(1 for r in rows if r["mse"] is None),
        "converged": sum(1 for r in rows if r["converged"]),
        "restarts": sum(r["restarts"] for r in rows),
        **{k: _centre([r[k] for r in rows]) for k in ("iterations", "evaluations", "seconds")},
    }


def _centre(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None}
    return {"mean": statistics.fmean(values), "median": float(statistics.median(values))}


def _paper_values(dataset: str) -> dict[str, Any]:
    if dataset not in paper.LABEL_ACCURACY:
        return {}
    return {
        "label_accuracy": paper.LABEL_ACCURACY[dataset],
        "fidelity_approx": {
            m: {threshold_key(t): v for t, v in paper.paper_fidelity(dataset, m).items()}
            for m in METHODS
        },
    }


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """Write summary.json atomically."""
    write_json(out / "summary.json", summary)


def save_strip_frames(
    out: Path, method: str, original: torch.Tensor, result: Reconstruction
) -> None:
    """Keep the strip experiment's frames on disk, so strip.png survives a resume.

    DLG and iDLG of that experiment may finish in different invocations; each
    leaves its frames in ``strip-<method>.npz`` and the strip is drawn from those.
    """
    tmp = out / f"strip-{method}.npz.tmp"
    tmp.write_bytes(strip_frames(original, result))
    tmp.replace(out / f"strip-{method}.npz")


def strip_frames(original: torch.Tensor, result: Reconstruction) -> bytes:
    """The contents of ``strip-<method>.npz``: the snapshots, the result, the original."""
    steps = [s.step for s in result.snapshots if s.step < result.steps]
    frames = [s.inputs[0] for s in result.snapshots if s.step < result.steps]
    frames.append(result.inputs[0].detach().cpu())
    steps.append(result.steps)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        steps=np.array(steps, dtype=np.int64),
        frames=torch.stack([f.float() for f in frames]).numpy(),
        original=original.detach().float().cpu().numpy(),
    )
    return buffer.getvalue()


def _strip_rows(out: Path) -> list[tuple[str, list[tuple[str, torch.Tensor]]]]:
    rows: list[tuple[str, list[tuple[str, torch.Tensor]]]] = []
    for method in METHODS:
        path = out / f"strip-{method}.npz"
        if not path.exists():
            continue
        with np.load(path) as saved:
            steps, frames = saved["steps"].tolist(), torch.from_numpy(saved["frames"])
            original = torch.from_numpy(saved["original"])
        # Evenly spaced frames, always keeping the first and the final one.
        picks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), STRIP_FRAMES)).round())
        shown = [(f"step {steps[i]}", frames[i]) for i in picks.astype(int)]
        rows.append((LABELS[method], [("original", original), *shown]))
    return rows


def write_dataset_report(out: Path, summary: dict[str, Any]) -> None:
    """Write fidelity.png, strip.png (when its frames exist) and report.md."""
    dataset = summary["dataset"]
    name = NAMES.get(dataset, dataset)
    n, mode = summary["experiments"], summary["mode"]
    methods = summary["methods"]
    ours = {LABELS[m]: [_percent(v) for v in methods[m]["fidelity"].values()] for m in METHODS}
    reference = {
        LABELS[m]: [100 * v for v in paper.paper_fidelity(dataset, m).values()] for m in METHODS
    }
    report.save_fidelity_plot(
        out / "fidelity.png",
        FIDELITY_THRESHOLDS,
        ours,
        reference=reference,
        reference_label=paper.FIDELITY_SOURCE,
        title=f"{name}: fidelity of DLG vs iDLG, N={n}, {mode}",
    )
    rows = _strip_rows(out)
    if rows:
        report.save_strip_rows(
            out / "strip.png",
            rows,
            title=f"{name}, experiment {STRIP_EXPERIMENT}: the dummy as L-BFGS runs ({mode})",
        )
    lines = [f"# iDLG reproduction: {name}", "", *_run_lines(summary), *_data_lines(out, dataset)]
    lines += [""]
    lines += ["## Table 1: label accuracy", "", "| method | ours | paper |", "|---|---|---|"]
    for m in METHODS:
        stats = methods[m]
        ours_text = (
            f"{_pct(stats['label_accuracy'])} ({stats['label_correct']}/{stats['experiments']})"
        )
        lines.append(f"| {LABELS[m]} | {ours_text} | {_pct(paper.LABEL_ACCURACY[dataset][m])} |")
    lines += ["", *_fidelity_table(dataset, methods), "", "![fidelity](fidelity.png)", ""]
    lines += _cost_table(methods)
    if rows:
        lines += ["", "## Figure 2: the optimisation, DLG vs iDLG", "", "![strip](strip.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _run_lines(summary: Mapping[str, Any], scope: str = "") -> list[str]:
    return [
        f"Reproduces Table 1 and Figure 1 of [{paper.PAPER_TITLE}]({paper.PAPER_URL}).",
        "",
        f"- command: `{summary['command']}`",
        f"- N = {summary['experiments']} experiments{scope} "
        f"({summary['complete']} complete with both methods), "
        f"mode {summary['mode']}, engine {summary['engine']}, device {summary['device']}, "
        f"seed {summary['seed']}",
        f"- time: {summary['attack_seconds']:.1f} s of attacks over all runs of this folder; "
        f"this run's wall time {summary['wall_seconds']:.1f} s",
        f"- gradleak {summary['gradleak']}, torch {summary['torch']}"
        + (
            ""
            if scope
            else "; results: [results.jsonl](results.jsonl), [summary.json](summary.json)"
        ),
    ]


def _data_lines(folder: Path, dataset: str) -> list[str]:
    """How many images the victims came from (run.json's dataset size), and which split."""
    name = NAMES.get(dataset, dataset)
    if dataset == "lfw":
        split = "LFW has no split: every image, as in the original iDLG code"
    else:
        split = (
            f"gradleak draws from {name}'s test split, where the original iDLG code read "
            "the train split (torchvision's default)"
        )
    return [f"- data: {data_source(folder, dataset)}", f"- split: {split}"]


def _fidelity_table(dataset: str, methods: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Figure 1: share of experiments with MSE below a threshold",
        "",
        "Paper columns: read off Fig. 1 by eye at 0.01 and 0.0001 (approx.), "
        "interpolated in between.",
        "",
        "| MSE below | DLG ours | DLG paper | iDLG ours | iDLG paper |",
        "|---|---|---|---|---|",
    ]
    for t in FIDELITY_THRESHOLDS:
        cells = []
        for m in METHODS:
            cells += [
                _pct(methods[m]["fidelity"][threshold_key(t)]),
                f"~{_pct(paper.paper_fidelity(dataset, m)[t])}",
            ]
        lines.append(f"| {t:g} | " + " | ".join(cells) + " |")
    return lines


def _cost_table(methods: Mapping[str, Any]) -> list[str]:
    lines = [
        "## Cost",
        "",
        "| method | diverged | converged | restarts | evaluations (mean / median) "
        "| seconds (mean / median) |",
        "|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        s = methods[m]
        ev, sec = s["evaluations"], s["seconds"]
        lines.append(
            f"| {LABELS[m]} | {s['diverged']} | {s['converged']} | {s['restarts']} "
            f"| {_num(ev['mean'], '.0f')} / {_num(ev['median'], '.0f')} "
            f"| {_num(sec['mean'], '.2f')} / {_num(sec['median'], '.2f')} |"
        )
    return lines


def write_combined_report(out: Path, summaries: Sequence[Mapping[str, Any]]) -> None:
    """OUT/report.md for ``--all-datasets``: Table 1 and fidelity of every dataset."""
    lines = ["# iDLG reproduction: all datasets", ""]
    if summaries:
        # The datasets ran one after another in this invocation: their times add up.
        combined = {
            **summaries[0],
            "complete": min(s["complete"] for s in summaries),
            "attack_seconds": sum(s["attack_seconds"] for s in summaries),
            "wall_seconds": sum(s["wall_seconds"] for s in summaries),
        }
        lines += [*_run_lines(combined, " per dataset"), ""]
    lines += [
        "## Table 1: label accuracy (ours / paper)",
        "",
        "| dataset | N | DLG | iDLG | details |",
        "|---|---|---|---|---|",
    ]
    for s in summaries:
        d = s["dataset"]
        cells = [
            f"{_pct(s['methods'][m]['label_accuracy'])} / {_pct(paper.LABEL_ACCURACY[d][m])}"
            for m in METHODS
        ]
        link = f"[report]({d}/report.md), [fidelity]({d}/fidelity.png), [strip]({d}/strip.png)"
        lines.append(f"| {NAMES[d]} | {s['experiments']} | {' | '.join(cells)} | {link} |")
    for s in summaries:
        lines += ["", f"### {NAMES[s['dataset']]}", ""]
        lines += [*_data_lines(out / s["dataset"], s["dataset"]), ""]
        lines += _fidelity_table(s["dataset"], s["methods"])[2:]
        lines += ["", f"![{s['dataset']} fidelity]({s['dataset']}/fidelity.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _percent(share: float | None) -> float:
    return math.nan if share is None else 100 * share


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
