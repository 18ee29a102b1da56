"""What `gradleak reproduce dlg-batch` makes of its results: summary, plots, report.md.

Computed from the lines of results.jsonl alone, so the summary agrees with
them whatever mix of runs and resumes wrote them.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradleak import report
from gradleak.experiments.common import data_source, write_json
from gradleak.metrics import match_reconstructions
from gradleak.types import Reconstruction

# DLG (Zhu et al., NeurIPS 2019), Table 2: iterations to converge per batch size.
PAPER_ITERATIONS = {1: 270, 2: 600, 4: 1300, 8: 2800}
PAPER_SOURCE = "DLG Table 2 (approx.)"
LABELS = {"dlg": "DLG (faithful)", "improved": "improved"}
STRIP_EXPERIMENT = 0  # the experiment whose reconstructions strip.png shows


def summarise(
    rows: Sequence[Mapping[str, Any]],
    batch_sizes: Sequence[int],
    experiments: int,
    methods: Sequence[str],
    **context: Any,
) -> dict[str, Any]:
    """Per batch size and method: share recovered, iterations and evaluations."""
    table: dict[str, dict[str, Any]] = {}
    for size in batch_sizes:
        kept = [r for r in rows if r["batch_size"] == size and r["experiment"] < experiments]
        table[str(size)] = {
            "paper_iterations": PAPER_ITERATIONS.get(size),
            "methods": {m: _stats([r for r in kept if r["method"] == m]) for m in methods},
        }
    return {
        **context,
        "batch_sizes": list(batch_sizes),
        "experiments": experiments,
        "methods": list(methods),
        "attack_seconds": round(sum(r["seconds"] for r in rows), 3),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recovered_if": "every matched image MSE < 1e-3 and every matched label exact",
        "batch": table,
    }


def _stats(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    won = [r for r in rows if r["recovered"]]
    return {
        "experiments": len(rows),
        "recovered": len(won),
        "recovered_share": len(won) / len(rows) if rows else None,
        "labels_exact": sum(1 for r in rows if r["labels_exact"]),
        # Cost until recovered: over the recovered batches only.
        "iterations_recovered": _centre([r["iterations"] for r in won]),
        "evaluations_recovered": _centre([r["evaluations"] for r in won]),
        "iterations_all": _centre([r["iterations"] for r in rows]),
        "seconds": _centre([r["seconds"] for r in rows]),
    }


def _centre(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None}
    return {"mean": statistics.fmean(values), "median": float(statistics.median(values))}


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """Write summary.json atomically."""
    write_json(out / "summary.json", summary)


def save_strip_batch(
    out: Path, batch_size: int, method: str, originals: torch.Tensor, result: Reconstruction
) -> None:
    """Keep one batch's reconstructions (matched to the originals) for strip.png."""
    path = out / strip_name(batch_size, method)
    path.with_suffix(".tmp").write_bytes(strip_batch(originals, result))
    path.with_suffix(".tmp").replace(path)


def strip_name(batch_size: int, method: str) -> str:
    """The file that keeps batch size `batch_size`'s strip row of `method`."""
    return f"strip-b{batch_size}-{method}.npz"


def strip_batch(originals: torch.Tensor, result: Reconstruction) -> bytes:
    """The contents of a strip file: originals and matched reconstructions."""
    permutation, _ = match_reconstructions(result.inputs.cpu(), originals)
    matched = result.inputs.detach().cpu()[permutation].float().numpy()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, originals=originals.float().numpy(), matched=matched)
    return buffer.getvalue()


def _strip_rows(out: Path, summary: Mapping[str, Any]) -> list[tuple[str, list]]:
    rows: list[tuple[str, list]] = []
    for size in summary["batch_sizes"]:
        for method in summary["methods"]:
            path = out / f"strip-b{size}-{method}.npz"
            if not path.exists():
                continue
            with np.load(path) as saved:
                originals, matched = saved["originals"], saved["matched"]
            if not any(name.startswith(f"B={size} original") for name, _ in rows):
                rows.append((f"B={size} original", [("", torch.from_numpy(o)) for o in originals]))
            rows.append((f"B={size} {method}", [("", torch.from_numpy(m)) for m in matched]))
    return rows


def save_iterations_plot(path: Path, summary: Mapping[str, Any]) -> None:
    """Iterations until recovered (median) vs batch size, ours and the paper's."""
    import matplotlib.pyplot as plt

    sizes = summary["batch_sizes"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in summary["methods"]:
        ys = [
            summary["batch"][str(b)]["methods"][method]["iterations_recovered"]["median"]
            for b in sizes
        ]
        ax.plot(
            sizes, [np.nan if y is None else y for y in ys], "o-", label=f"{LABELS[method]} (ours)"
        )
    paper = [(b, PAPER_ITERATIONS[b]) for b in sizes if b in PAPER_ITERATIONS]
    if paper:
        ax.plot(*zip(*paper, strict=True), "s--", color="grey", label=PAPER_SOURCE)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(b) for b in sizes])
    ax.set_xlabel("batch size")
    ax.set_ylabel("L-BFGS iterations until recovered (median)")
    ax.set_title(f"{summary['dataset']}, N={summary['experiments']} per batch size", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, summary: Mapping[str, Any]) -> None:
    """Write iterations.png, strip.png (when frames exist) and report.md."""
    save_iterations_plot(out / "iterations.png", summary)
    strip = _strip_rows(out, summary)
    if strip:
        report.save_strip_rows(
            out / "strip.png",
            strip,
            title=f"experiment {STRIP_EXPERIMENT}: originals and matched reconstructions",
        )
    methods = summary["methods"]
    lines = [
        "# DLG reproduction: batches (Table 2)",
        "",
        f"- command: `{summary['command']}`",
        f"- dataset {summary['dataset']}, model {_model(summary.get('model', 'lenet'))} "
        "(fresh per experiment), "
        f"N = {summary['experiments']} per batch size, at most {summary['iterations_cap']} "
        f"L-BFGS steps, device {summary['device']}, seed {summary['seed']}, batched engine",
        f"- data: {data_source(out, summary['dataset'])}",
        f"- recovered: {summary['recovered_if']}",
        f"- time: {summary['attack_seconds']:.1f} s of attacks over all runs of this folder; "
        f"this run's wall time {summary['wall_seconds']:.1f} s",
        f"- gradleak {summary['gradleak']}, torch {summary['torch']}; "
        "results: [results.jsonl](results.jsonl), [summary.json](summary.json)",
        "",
        "Iterations and evaluations: median (mean) over the recovered batches only.",
        "",
        "| B | paper iterations | "
        + " | ".join(f"{LABELS[m]}: recovered | iterations | evaluations" for m in methods)
        + " |",
        "|---|---|" + "---|---|---|" * len(methods),
    ]
    for size in summary["batch_sizes"]:
        entry = summary["batch"][str(size)]
        cells = [str(size), _num(entry["paper_iterations"], "d")]
        for m in methods:
            s = entry["methods"][m]
            cells.append(f"{_pct(s['recovered_share'])} ({s['recovered']}/{s['experiments']})")
            for key in ("iterations_recovered", "evaluations_recovered"):
                c = s[key]
                cells.append(f"{_num(c['median'], '.0f')} ({_num(c['mean'], '.0f')})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Paper column: {PAPER_SOURCE}.", "", "![iterations](iterations.png)"]
    if strip:
        lines += ["", "![strip](strip.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"


def _model(name: str) -> str:
    return {
        "lenet-dlg": "lenet-dlg (DLG's LeNet: strides removed, uniform init)",
        "lenet": "lenet (iDLG's LeNet: strides 2, 2, 1, uniform init)",
    }.get(name, name)


def _num(value: float | int | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
