"""The audit's files: leakage.json, report.md (verdict first) and one PNG strip per target.

Everything here is written from the stored rows (results.jsonl) and the
frames the tasks sent back (``strips/<round>/<node>.npz``), so a resumed or
interrupted audit writes the same report for what it has.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradleak.integrations.reader import Exchange
from gradleak.sweep.store import write_json

LEAKAGE = "leakage.json"
REPORT = "report.md"
OVERVIEW = "overview.png"
DEMO_SETTINGS = "demo.json"  # written into the capture folder by `gradleak flower-demo`

# The keys of a leakage.json entry, in order (results.jsonl rows carry them all).
KEYS = (
    "round", "node_id", "nodes", "num_examples", "shared", "lr", "local_steps", "epochs",
    "local_batch", "clipping_norm", "clipped", "update_norm", "update_cosine", "method", "reason",
    "true_labels", "predicted_labels", "label_accuracy", "mse", "psnr", "ssim", "per_image_mse",
    "images_rebuilt", "per_image_psnr", "per_image_ssim", "images_recognisable",
    "label_counts_true", "label_counts_read", "histogram_error", "class_set_exact", "verdict",
    "recovered_bins", "resolution",
    "matching_loss", "converged", "iterations", "seconds", "strip", "leaked", "error",
)  # fmt: skip


STRIP_ROW = 16  # images in a row of the dishonest server's strip


def frames_file(item: Any) -> str:
    return f"strips/{item.key}.npz"


def strip_file(key: str) -> str:
    return f"strips/{key}.png"


def refused_entry(item: Any, parts: Sequence[Exchange], error: str) -> dict[str, Any]:
    """The leakage.json entry of a target whose capture was refused: the error, nothing scored."""
    entry = {key: None for key in KEYS}
    entry |= {
        "item": item.key,
        "round": item.round,
        "node_id": None if item.aggregate else item.node_ids[0],
        "nodes": list(item.node_ids),
        "num_examples": sum(p.num_examples or 0 for p in parts) or None,
        "converged": False,
        "iterations": 0,
        "leaked": "not audited (capture refused)",
        "error": error,
    }
    return entry


def unreadable_entry(refused: Any) -> dict[str, Any]:
    """The leakage.json entry of a sidecar that could not be read (`reader.Refused`)."""
    entry = {key: None for key in KEYS}
    node = refused.node_id
    entry |= {
        "item": refused.sidecar.removesuffix(".json"),
        "round": refused.round,
        "node_id": node,
        "nodes": [] if node is None else [node],
        "converged": False,
        "iterations": 0,
        "leaked": "not audited (capture refused)",
        "error": refused.reason,
    }
    return entry


def leaked(row: Mapping[str, Any], rebuilt_mse: float) -> str:
    """What this target gave away, in words."""
    if row.get("error"):
        return "not attacked"
    n = row["num_examples"]
    if row.get("method") == "labels":
        if row.get("histogram_error") is not None:
            exact = "exact" if row["class_set_exact"] else "not exact"
            return (
                f"labels only (images not attacked): {row['histogram_error']:.0%} of the "
                f"histogram misplaced, class set {exact}"
            )
        return "labels only (images not attacked, no ground truth to score the histogram)"
    if row.get("mse") is not None or row.get("label_accuracy") is not None:
        images = row.get("images_rebuilt") or 0
        accuracy = row.get("label_accuracy") or 0.0
        return f"{images}/{n} images rebuilt (MSE < {rebuilt_mse:g}), labels {accuracy:.0%} right"
    if row.get("converged"):
        return "update matched: the strip is likely the private data (no ground truth here)"
    return "update not matched (no ground truth here)"


def write_all(
    out: Path,
    rows: Iterable[Mapping[str, Any]],
    refused: Sequence[Mapping[str, Any]],
    notes: Sequence[str],
    problems: Sequence[str],
    context: Mapping[str, Any],
) -> dict[str, Any]:
    """Write leakage.json, the strips and report.md; return the summary."""
    entries = []
    for row in rows:
        entry = {key: row.get(key) for key in KEYS} | {"item": row["item"]}
        entry["leaked"] = leaked(row, context["rebuilt_mse"])
        if _render_strip(out, row):
            entry["strip"] = strip_file(row["item"])
        entries.append(entry)
    overview = _render_overview(out, sorted(rows, key=lambda r: (r["round"], r["node_id"] or 0)))
    entries += [dict(e) for e in refused]
    entries.sort(key=lambda e: (e["round"], e["node_id"] if e["node_id"] is not None else -1))
    (out / LEAKAGE).write_text(json.dumps(entries, indent=1, allow_nan=False) + "\n")
    demo = _demo_settings(Path(context["captures"]))
    summary = {
        "entries": entries,
        "notes": list(notes),
        "problems": list(problems),
        "demo": demo,
        "overview": overview,
        **context,
    }
    (out / REPORT).write_text(markdown(summary))
    write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "entries"})
    return summary


def verdict(summary: Mapping[str, Any]) -> list[str]:
    """The report's first screen: per round what leaked, what the server saw, what would help."""
    entries = [e for e in summary["entries"] if not e.get("error")]
    lines: list[str] = []
    if summary.get("malicious"):
        rebuilt = sum(e.get("images_rebuilt") or 0 for e in entries)
        total = sum(e["num_examples"] or 0 for e in entries)
        refused = sum(1 for note in summary["notes"] if "ModelGuard refused" in note)
        front = summary["malicious"].get("front")
        if not summary["entries"] and not refused:
            lines.append(
                "- **Nothing reached the server**: no client reply was recorded (under SecAgg+ "
                "a round aborts when its clients refuse the weights, as ModelGuard does)."
            )
        lines.append(
            "- **A DISHONEST SERVER**: this run's server sent weights crafted to read the "
            f"clients' images back ({_dishonest(summary['malicious'])}): "
            f"{rebuilt} of {total} private images read back exactly (MSE < 1e-4"
            + ("" if front is None else f" at {front['resolution']}")
            + ")"
            + (f"; {refused} client replies refused by ModelGuard" if refused else "")
            + "."
        )
    for round_ in sorted({e["round"] for e in summary["entries"]}):
        here = [e for e in entries if e["round"] == round_]
        refused = [e for e in summary["entries"] if e["round"] == round_ and e.get("error")]
        lines.append(
            f"- **Round {round_}**: {_round_verdict(here, refused, summary['rebuilt_mse'])}"
        )
    seen = _what_was_seen(entries)
    if seen:
        lines.append(f"- **What the server saw**: {seen}.")
    lines.append(
        f"- **What would have prevented it**: {_prevention(entries, summary['rebuilt_mse'])}"
    )
    return lines


def _dishonest(plan: Mapping[str, Any]) -> str:
    """The dishonest server's attack in words, from its plan."""
    what = f"{plan['attack']} on layer '{plan['layer']}'"
    if plan.get("front") is not None:
        what += ", the convolutions below set to pass the input through"
    return what


def _round_verdict(here: list[dict], refused: list[dict], bar: float) -> str:
    parts = []
    for e in (e for e in here if e["shared"] == "aggregate"):
        m = e["num_examples"]
        said = (
            f"the server got only the aggregate of {len(e['nodes'])} clients (their replies were "
            f"identical: secure aggregation) and attacked it as one batch of {m} images"
        )
        if e["mse"] is not None:
            labels = round((e["label_accuracy"] or 0) * m)
            said += (
                f": {e['images_rebuilt']} of {m} images rebuilt (MSE < {bar:g}), {labels} of {m} "
                "labels read, though not which client had which"
            )
        parts.append(said)
    skipped = [e for e in here if e.get("method") == "labels"]
    if skipped:
        parts.append(
            f"{len(skipped)} clients of more examples than --max-examples: labels read, "
            "images not attacked"
        )
    scored = [e for e in here if e["mse"] is not None and e["shared"] != "aggregate"]
    if scored:
        images = sum(e["images_rebuilt"] or 0 for e in scored)
        total = sum(e["num_examples"] for e in scored)
        whole = sum(1 for e in scored if e["images_rebuilt"] == e["num_examples"])
        labels = sum(1 for e in scored if e["label_accuracy"] == 1.0)
        parts.append(
            f"{images} of {total} private images rebuilt (MSE < {bar:g}), every image of {whole} "
            f"of {len(scored)} clients; every label of {labels} of {len(scored)} clients read; "
            f"worst MSE {max(e['mse'] for e in scored):.1e}"
        )
    unscored = [e for e in here if e["mse"] is None and e.get("method") != "labels"]
    if unscored:
        matched = sum(1 for e in unscored if e["converged"])
        parts.append(
            f"{matched} of {len(unscored)} updates matched by the attack (no ground truth to "
            "score them: see the strips)"
        )
    histograms = [e for e in here if e.get("histogram_error") is not None]
    if histograms:
        exact = sum(1 for e in histograms if e["class_set_exact"])
        mean = sum(e["histogram_error"] for e in histograms) / len(histograms)
        parts.append(
            f"label histograms read from {len(histograms)} updates: the exact class set for "
            f"{exact} of {len(histograms)}, {mean:.0%} of examples misplaced on average"
        )
    recognisable = [e for e in here if e.get("images_recognisable") is not None]
    if recognisable:
        count = sum(e["images_recognisable"] for e in recognisable)
        total = sum(e["num_examples"] for e in recognisable)
        parts.append(f"{count} of {total} attacked images recognisable (PSNR >= 20 dB or "
                     "SSIM >= 0.6)")  # fmt: skip
    if refused:
        parts.append(f"{len(refused)} not audited (see Problems)")
    return "; ".join(parts) + "." if parts else "nothing audited."


def _what_was_seen(entries: list[dict]) -> str:
    if not entries:
        return ""
    facts = []
    steps = sorted({e["local_steps"] or 0 for e in entries if e["local_steps"]})
    kinds = Counter(e["shared"] for e in entries)
    if kinds.get("gradient"):
        facts.append(
            f"{kinds['gradient']} individual one-step updates (each is -lr x the client's gradient)"
        )
    if kinds.get("update"):
        epochs = sorted({e["epochs"] for e in entries if e.get("epochs")})
        schedule = (
            f"{', '.join(map(str, steps))} local steps"
            if steps
            else f"{', '.join(map(str, epochs))} local epochs"
        )
        facts.append(f"{kinds['update']} individual updates of {schedule}")
    if kinds.get("aggregate"):
        facts.append(f"{kinds['aggregate']} round aggregates instead of individual updates")
    clipped = [e for e in entries if e["clipped"]]
    if clipped:
        facts.append(
            f"{len(clipped)} updates clipped by the clients to norm {clipped[0]['clipping_norm']:g}"
        )
    cosines = [e["update_cosine"] for e in entries if e["update_cosine"] is not None]
    if cosines:
        low, high = min(cosines), max(cosines)
        facts.append(
            f"cosine of each received update with the one its client computed: {low:.3f} to "
            f"{high:.3f}" + (" (noise drowned the updates)" if high < 0.5 else "")
        )
    return "; ".join(facts)


def _prevention(entries: list[dict], bar: float) -> str:
    individual = any(e["shared"] != "aggregate" for e in entries)
    rebuilt = any(
        (e["images_rebuilt"] or 0) > 0 or (e["mse"] is None and e["converged"]) for e in entries
    )
    if not rebuilt:
        cosines = [e["update_cosine"] for e in entries if e["update_cosine"] is not None]
        if cosines and max(cosines) < 0.5:
            return (
                "nothing was rebuilt here: noise added on the clients (local DP) left updates "
                "that point elsewhere than the clients' own, and the attack had nothing to match."
            )
        return f"nothing was rebuilt here below MSE {bar:g}."
    advice = []
    if individual:
        advice.append(
            "noise added on each client before sending (local DP, Flower's LocalDpMod) is the "
            "only DP option of Flower that changes what the server receives from a client; "
            "server-side DP clips and adds noise after the server holds every update, and "
            "client-side clipping only rescales an update, keeping its direction"
        )
        advice.append(
            "secure aggregation (Flower's SecAgg+) would have shown the server only each "
            "round's aggregate, which hides which client sent what but, for a few clients with "
            "small batches, is still the gradient of one small batch"
        )
    if any(e["shared"] == "gradient" for e in entries):
        advice.append(
            "one local step on a small batch sends the gradient itself: more local steps and "
            "larger batches make the update harder to invert, though not safe by themselves"
        )
    if any(e["shared"] == "aggregate" for e in entries):
        advice.append(
            "an aggregate of few one-step clients is the gradient of one small batch: more "
            "clients per round, larger batches or noise on each client would have hidden it"
        )
    return "; ".join(advice) + "."


def markdown(summary: Mapping[str, Any]) -> str:
    entries = summary["entries"]
    lines = ["# What this Flower run leaked to its server", ""]
    lines += verdict(summary)
    lines += ["", "## Per round and client", ""]
    lines += [
        "| round | node | examples | server saw | method | labels: true -> read | MSE | PSNR | "
        "SSIM | update cosine | leaked |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        node = (
            "aggregate"
            if e["node_id"] is None and e["nodes"] and len(e["nodes"]) > 1
            else e["node_id"]
        )
        labels = f"{_labels(e['true_labels'])} -> {_labels(e['predicted_labels'])}"
        seen = e["shared"] or "refused"
        if e.get("clipped"):
            seen += " (clipped)"
        lines.append(
            f"| {e['round']} | {node} | {e['num_examples']} | {seen} | {e['method'] or ''} | "
            f"{labels} | {_num(e['mse'], '.1e')} | {_num(e['psnr'], '.1f')} | "
            f"{_num(e['ssim'], '.3f')} | {_num(e['update_cosine'], '.3f')} | "
            f"{e['error'] or e['leaked']} |"
        )
    lines += _histogram_table(entries)
    lines += _line_section(summary.get("line"))
    strips = [e for e in entries if e.get("strip")]
    if strips:
        lines += ["", "## Reconstructions", ""]
        if summary.get("overview"):
            lines += [f"![every round]({summary['overview']})", ""]
        lines += [
            "Each strip: the clients' private images (where known) over what the server "
            "rebuilt from their update, with the labels it read.",
            "",
        ]
        for e in strips:
            who = f"node {e['node_id']}" if e["node_id"] is not None else "aggregate"
            lines += [f"![round {e['round']}, {who}]({e['strip']})", ""]
    lines += ["## How this was measured", ""]
    model = summary["model"]
    lines += [
        f"- Capture: `{summary['captures']}` ({summary['stack']} stack, strategy "
        f"`{summary['strategy']}`).",
        f"- Model: `{model['name']}`, input {tuple(model['input_shape'])}, "
        f"{model['num_classes']} classes"
        + (f", width {model['width']}" if model["width"] else "")
        + ".",
        f"- Method `{summary['method']}` (per target, why: leakage.json and below), "
        f"iterations {summary['iterations'] or 'the method default'}, IG TV scale "
        f"{summary['tv_scale']:g}, seed {summary['seed']}; run on {summary['executor']}.",
        f"- A private image counts as rebuilt when its reconstruction's MSE is below "
        f"{summary['rebuilt_mse']:g}; labels are compared as multisets.",
        f"- Command: `{summary['command'] or 'gradleak audit'}`; {summary['date']}, gradleak "
        f"{summary['gradleak']}, torch {summary['torch']}; {summary['wall_seconds']:.0f} s.",
    ]
    reasons = sorted({(e["method"], e["reason"]) for e in entries if e.get("reason")})
    for method, reason in reasons:
        lines.append(f"- `{method}`: {reason}.")
    demo = summary.get("demo")
    if demo:
        lines += ["", "## The demo's settings", ""]
        lines += [f"- {key}: `{value}`" for key, value in demo.items()]
    if summary["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in summary["notes"]]
    if summary["problems"]:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in summary["problems"]]
    return "\n".join(lines) + "\n"


def _histogram_table(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """Per client: the labels it held, the histogram read from its update, and the verdict."""
    rows = [e for e in entries if e.get("label_counts_read") is not None or e.get("verdict")]
    if not rows:
        return []
    lines = [
        "",
        "## Labels and verdict per client",
        "",
        "Histogram error: the share of the client's examples the histogram read from its "
        "update puts in a wrong class (0 exact, 1 all wrong). Verdict: `images` when an image "
        "is recognisable (PSNR >= 20 dB or SSIM >= 0.6), `label histogram` when at most 10% of "
        "it is misplaced, `class set` when only the classes are right.",
        "",
        "| round | node | examples | held (class x count) | read | histogram error | "
        "class set | recognisable images | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        node = "aggregate" if e["node_id"] is None else e["node_id"]
        exact = e.get("class_set_exact")
        lines.append(
            f"| {e['round']} | {node} | {e['num_examples']} | {_counts(e.get('label_counts_true'))}"
            f" | {_counts(e.get('label_counts_read'))} | {_num(e.get('histogram_error'), '.0%')} | "
            f"{'n/a' if exact is None else ('exact' if exact else 'not exact')} | "
            f"{'n/a' if e.get('images_recognisable') is None else e['images_recognisable']} | "
            f"{e.get('verdict') or ''} |"
        )
    return lines


def _line_section(points: Sequence[Mapping[str, Any]] | None) -> list[str]:
    """Where images come back for this model and schedule (`line.find_line`)."""
    if not points:
        return []
    back = [p["examples"] for p in points if p["share"] >= 0.5]
    said = (
        f"images come back (at least half recognisable) for clients of up to {max(back)} examples"
        if back
        else "no client size tried gave back half of its images"
    )
    lines = [
        "",
        "## Where the line lies",
        "",
        f"Synthetic clients trained as this app's clients are (round {points[0]['round']}'s "
        f"weights, the same schedule and optimiser), attacked as above: {said}.",
        "",
        "| examples per client | clients | images recognisable | mean PSNR (dB) | attack s |",
        "|---|---|---|---|---|",
    ]
    for p in points:
        lines.append(
            f"| {p['examples']} | {p['clients']} | {p['recognisable']}/"
            f"{p['examples'] * p['clients']} | {_num(p['psnr'], '.1f')} | {p['seconds']:.0f} |"
        )
    return lines


def _counts(histogram: Mapping[str, int] | None) -> str:
    if histogram is None:
        return "?"
    return " ".join(f"{c}x{n}" for c, n in histogram.items())


def _render_strip(out: Path, row: Mapping[str, Any]) -> bool:
    """One PNG per target: its private images (where known) beside what was rebuilt."""
    from gradleak.report import save_strip_rows

    frames = _frames(out, row)
    if not frames:
        return False
    who = (
        f"node {row['node_id']}"
        if row["node_id"] is not None
        else f"aggregate of {len(row['nodes'])}"
    )
    read = _labels(row["predicted_labels"])
    title = f"round {row['round']}, {who}\n{row['method']}: labels read {read}"
    if row.get("resolution") is not None:  # the dishonest server's decoder
        title = (
            f"round {row['round']}, {who}\n{row['method']}: {row['images_rebuilt']} of "
            f"{row['num_examples']} exact\nat {row['resolution']}"
        )
    elif row.get("mse") is not None:
        title += (
            f"\nMSE {row['mse']:.1e}, PSNR {row['psnr']:.1f} dB\n"
            f"SSIM {row['ssim']:.3f}, labels {row['label_accuracy']:.0%} right"
        )
    lines = [("", frames)]
    if row.get("resolution") is not None and row.get("per_image_mse"):
        # The dishonest server's strip: the private images reduced as its layers reduce
        # them over what it read back (pairs, private first), two rows of at most 16.
        shown = frames[: 2 * STRIP_ROW]
        lines = [("private, reduced", shown[0::2]), ("read back", shown[1::2])]
    save_strip_rows(out / strip_file(row["item"]), lines, title=title)
    return True


def _frames(out: Path, row: Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """Caption and image pairs: private then rebuilt, image by image (matched order)."""
    source = out / f"strips/{row['item']}.npz"
    if not source.exists():
        return []
    with np.load(source) as saved:
        recovered, labels = saved["recovered"], saved["labels"]
        originals, true = saved["originals"], saved["true"]
    per_mse = row.get("per_image_mse") or [None] * len(recovered)
    frames: list[tuple[str, torch.Tensor]] = []
    for i, (image, label) in enumerate(zip(recovered, labels, strict=True)):
        if len(originals):
            frames.append((f"private: {int(true[i])}", torch.from_numpy(originals[i])))
        mse = per_mse[i]
        read = "read" if int(label) < 0 else f"read {int(label)}"  # binning reads no label
        caption = read + ("" if mse is None else f", {mse:.0e}")
        frames.append((caption, torch.from_numpy(image)))
    return frames


def _render_overview(out: Path, rows: Sequence[Mapping[str, Any]]) -> str | None:
    """overview.png: one row per round, every target's private/rebuilt pairs side by side."""
    from gradleak.report import save_strip_rows

    lines = []
    for round_ in sorted({r["round"] for r in rows}):
        frames = [f for r in rows if r["round"] == round_ for f in _frames(out, r)]
        if frames:
            lines.append((f"round {round_}", frames))
    if not lines:
        return None
    save_strip_rows(out / OVERVIEW, lines, title="private images and what the server rebuilt")
    return OVERVIEW


def _labels(labels: Sequence[int] | None) -> str:
    if labels is None:
        return "?"
    counts = Counter(labels)
    return ", ".join(f"{c}x{label}" if c > 1 else str(label) for label, c in sorted(counts.items()))


def _num(value: float | None, spec: str) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def _demo_settings(captures: Path) -> dict[str, Any] | None:
    path = captures / DEMO_SETTINGS
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value.get("settings") if isinstance(value, dict) else None
