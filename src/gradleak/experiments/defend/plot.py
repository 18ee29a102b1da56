"""The pictures of `gradleak defend`: defense.png and examples.png.

defense.png is the DLG paper's defense figure in one glance: a panel per
defense, strength on the x axis, and on one 0-100% axis the attacks' success
(share of reconstructions still recognisable) falling as the model's test
accuracy (hopefully) holds.  Defenses without a knob (fp16, bf16, int8)
share one panel of bars next to the undefended baseline.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from gradleak import report  # noqa: E402

TITLES = {
    "gaussian": "Gaussian noise (std)",
    "laplacian": "Laplacian noise (scale b)",
    "prune": "pruning (share of each tensor zeroed)",
    "aggregate": "secure aggregation (clients k)",
    "batch": "batch size B",
    "dpsgd": "DP-SGD (noise multiplier, clip 1)",
}
# Where the DLG paper says the defense starts to work (drawn as a grey band).
PAPER_ONSET = {"gaussian": 1e-2, "laplacian": 1e-2, "prune": 0.2}
LINES = (  # (method, threshold key, line style, marker, colour, legend)
    ("idlg", "0.01", "-", "o", "tab:red", "iDLG: recognisable (MSE < 1e-2)"),
    ("dlg", "0.01", "-", "^", "tab:orange", "DLG: recognisable (MSE < 1e-2)"),
    ("idlg", "0.001", "--", "x", "tab:red", "iDLG: near-exact (MSE < 1e-3)"),
)
EXAMPLES = "examples"


def save_defense_plot(path: Path, summary: Mapping[str, Any]) -> None:
    """Draw defense.png from the summary's entries."""
    entries = summary["entries"]
    families = [n for n in dict.fromkeys(e["defense"] for e in entries) if n in TITLES]
    fixed = [e for e in entries if e["strength"] is None]
    panels = len(families) + (1 if fixed else 0)
    cols = min(3, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows + 0.9), squeeze=False)
    flat = list(axes.ravel())
    baseline = next((e for e in entries if e["defense"] == "none"), None)
    for ax, name in zip(flat, families, strict=False):
        _family_panel(ax, name, [e for e in entries if e["defense"] == name], baseline)
    if fixed:
        _fixed_panel(flat[len(families)], fixed)
    for ax in flat[panels:]:
        ax.axis("off")
    handles, labels = flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(
        f"{summary['dataset'].upper()}: attack success vs model accuracy per defense "
        f"(N={summary['experiments']}, {summary['mode']}, {summary['iterations']} steps)",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.1 if rows == 1 else 0.06, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _share(entry: Mapping[str, Any], method: str, threshold: str) -> float:
    value = entry["methods"][method]["fidelity"].get(threshold)
    return math.nan if value is None else 100 * value


def _family_panel(ax: Any, name: str, entries: list, baseline: Mapping | None) -> None:
    entries = sorted(entries, key=lambda e: e["strength"])
    x = [e["strength"] for e in entries]
    for method, threshold, style, marker, colour, legend in LINES:
        y = [_share(e, method, threshold) for e in entries]
        ax.plot(x, y, style, color=colour, marker=marker, ms=6, alpha=0.9, label=legend)
    accuracy = [math.nan if e["accuracy"] is None else 100 * e["accuracy"] for e in entries]
    ax.plot(x, accuracy, "-", color="black", marker="s", label="model test accuracy")
    if baseline is not None and baseline["accuracy"] is not None:
        ax.axhline(100 * baseline["accuracy"], color="grey", ls=":", label="accuracy, no defense")
    if name in PAPER_ONSET:
        ax.axvspan(
            PAPER_ONSET[name],
            max(x + [PAPER_ONSET[name]]) * 1.5,
            color="grey",
            alpha=0.12,
            label="DLG paper: defends here",
        )
    if name in ("gaussian", "laplacian", "dpsgd"):
        ax.set_xscale("log")
    elif name in ("aggregate", "batch"):
        ax.set_xscale("log", base=2)
    ticks = [f"{v:g}" for v in x]
    if name == "dpsgd":  # the privacy each noise level buys, under its tick
        ticks = [
            f"{t}\neps " + ("inf" if e["epsilon"] is None else f"{e['epsilon']:.2g}")
            for t, e in zip(ticks, entries, strict=True)
        ]
    ax.set_xticks(x)
    ax.set_xticklabels(ticks, fontsize=8)
    ax.minorticks_off()
    _frame(ax, TITLES[name])


def _fixed_panel(ax: Any, entries: list) -> None:
    positions = np.arange(len(entries))
    width = 0.2
    bars = [(m, t, c, lg) for m, t, style, _, c, lg in LINES if style == "-"]
    bars.append(("accuracy", None, "black", "model test accuracy"))
    for i, (method, threshold, colour, _) in enumerate(bars):
        if method == "accuracy":
            values = [math.nan if e["accuracy"] is None else 100 * e["accuracy"] for e in entries]
        else:
            values = [_share(e, method, threshold) for e in entries]
        ax.bar(positions + (i - 1) * width, values, width, color=colour, alpha=0.85)
    ax.set_xticks(positions)
    ax.set_xticklabels([e["label"] for e in entries], fontsize=8)
    _frame(ax, "no defense and lower precision")


def _frame(ax: Any, title: str) -> None:
    ax.set_ylim(-2, 104)
    ax.set_ylabel("%", fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)


def save_example(
    out: Path, label: str, method: str, recovered: torch.Tensor, original: torch.Tensor
) -> None:
    """Keep experiment 0's reconstruction under one defense for examples.png."""
    name, data = example_file(label, method, recovered, original)
    (out / EXAMPLES).mkdir(parents=True, exist_ok=True)
    (out / f"{name}.tmp").write_bytes(data)
    (out / f"{name}.tmp").replace(out / name)


def example_file(
    label: str, method: str, recovered: torch.Tensor, original: torch.Tensor
) -> tuple[str, bytes]:
    """The example's file, relative to the run folder, and its contents."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, recovered=recovered.float().numpy(), original=original.numpy())
    return f"{EXAMPLES}/{label.replace(' ', '_')}-{method}.npz", buffer.getvalue()


def save_examples(out: Path, summary: Mapping[str, Any]) -> bool:
    """Draw examples.png: the private image, then iDLG's result under each defense."""
    frames = []
    for entry in summary["entries"]:
        path = out / EXAMPLES / f"{entry['label'].replace(' ', '_')}-idlg.npz"
        if not path.exists():
            continue
        with np.load(path) as saved:
            if not frames:
                frames.append(("private image", torch.from_numpy(saved["original"])))
            frames.append((entry["label"], torch.from_numpy(saved["recovered"])))
    if not frames:
        return False
    report.save_strip(
        out / "examples.png",
        frames,
        columns=9,
        title="experiment 0: iDLG's reconstruction under each defense",
    )
    return True
