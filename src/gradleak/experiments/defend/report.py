"""What `gradleak defend` makes of its lines: summary.json, the paper check, report.md.

Everything is computed from results.jsonl and accuracy.jsonl alone, so the
summary agrees with them whatever mix of runs and resumes wrote them.

Attack success is the share of experiments whose reconstruction is within an
MSE threshold of the private image: below 1e-2 (PSNR above 20 dB) a digit is
still plainly recognisable; below 1e-3 it is near-exact.  A defense *stops*
the attack at a strength when neither DLG nor iDLG gets more than
`LEAK_LIMIT` of its reconstructions below 1e-2 -- unless the attacks recovered
nothing from the undefended gradient either: then the verdict is
"inconclusive".
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gradleak.experiments.common import data_source, write_json
from gradleak.experiments.defend import plot as defend_plot
from gradleak.metrics import FIDELITY_THRESHOLDS, fidelity

METHODS = ("dlg", "idlg")
LABELS = {"dlg": "DLG", "idlg": "iDLG"}
RECOGNISABLE = 1e-2
EXACT = 1e-3
LEAK_LIMIT = 0.1
PAPER = "Deep Leakage from Gradients (Zhu, Liu, Han; NeurIPS 2019), Section 5"
PAPER_URL = "https://arxiv.org/abs/1906.08935"

Config = tuple[str, float | None]


def key(threshold: float) -> str:
    """A fidelity threshold as a JSON key ("0.001")."""
    return f"{threshold:g}"


def summarise(
    rows: Sequence[Mapping[str, Any]],
    costs: Mapping[Config, Mapping[str, Any]],
    configs: Sequence[Config],
    *,
    experiments: int,
    context: Mapping[str, Any],
) -> dict[str, Any]:
    """The run's summary: per defense and strength, attack success and model accuracy."""
    kept = [r for r in rows if r["experiment"] < experiments]
    entries = []
    for name, strength in configs:
        mine = [r for r in kept if r["defense"] == name and r["strength"] == strength]
        methods = {m: _method([r for r in mine if r["method"] == m]) for m in METHODS}
        cost = costs.get((name, strength), {})
        leak = max((methods[m]["fidelity"][key(RECOGNISABLE)] or 0.0) for m in METHODS)
        entries.append(
            {
                "defense": name,
                "strength": strength,
                "label": name if strength is None else f"{name} {strength:g}",
                "methods": methods,
                "leak_share": leak,
                "stops_attack": bool(mine) and leak <= LEAK_LIMIT,
                "accuracy": cost.get("accuracy"),
                "epsilon": cost.get("epsilon"),
                "train_seconds": cost.get("seconds"),
            }
        )
    summary = {
        **context,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "thresholds": list(FIDELITY_THRESHOLDS),
        "leak_rule": f"stops the attack: at most {LEAK_LIMIT:.0%} of reconstructions "
        f"below MSE {RECOGNISABLE:g} for both DLG and iDLG",
        "attack_seconds": round(sum(r["seconds"] for r in kept), 1),
        "entries": entries,
    }
    summary["findings"] = findings(entries)
    return summary


def _method(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    mses = [math.nan if r["mse"] is None else r["mse"] for r in rows]
    shares = fidelity(mses)
    psnrs = [r["psnr"] for r in rows if r["psnr"] is not None]
    ssims = [r["ssim"] for r in rows if r["ssim"] is not None]
    return {
        "experiments": len(rows),
        "fidelity": {key(t): (None if math.isnan(v) else v) for t, v in shares.items()},
        "label_accuracy": sum(r["label_correct"] for r in rows) / len(rows) if rows else None,
        "psnr_mean": statistics.fmean(psnrs) if psnrs else None,
        "ssim_mean": statistics.fmean(ssims) if ssims else None,
        "mse_median": statistics.median(mses) if rows else None,
    }


def findings(entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The DLG paper's defense claims next to ours, for the defenses this run has.

    A threshold claim agrees when every tested strength below `leaks_below`
    leaks and every one from `stops_from` on stops the attack; strengths in
    between ("about") may go either way.
    """
    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for entry in entries:
        by_name.setdefault(entry["defense"], []).append(entry)
    out = []
    for name in ("gaussian", "laplacian"):
        if name in by_name:
            claim = "noise of scale about 1e-2 and above defends"
            out.append(_threshold_claim(by_name[name], f"{name} noise", claim, 5e-3, 1e-2))
    if "fp16" in by_name:
        entry = by_name["fp16"][0]
        ours = f"fp16: {_leak_text(entry)}"
        if "none" in by_name:
            ours += f" (no defense: {_leak_text(by_name['none'][0])})"
        claim = "half precision (fp16) does not defend"
        out.append(
            {"defense": "fp16", "paper": claim, "ours": ours, "agrees": not entry["stops_attack"]}
        )
    if "prune" in by_name:
        claim = "pruning more than about 20% of the gradient defends"
        out.append(_threshold_claim(by_name["prune"], "pruning", claim, 0.2, 0.3))
    for name, what in (("batch", "larger batches"), ("aggregate", "larger batches (as k clients)")):
        if name in by_name:
            largest = max(e["strength"] for e in by_name[name])
            claim = "larger batches defeat the attack"
            out.append(_threshold_claim(by_name[name], what, claim, 0.0, largest))
            break
    return out


def _threshold_claim(
    entries: Sequence[Mapping[str, Any]],
    what: str,
    paper: str,
    leaks_below: float,
    stops_from: float,
) -> dict[str, Any]:
    """From which strength on does the defense stop the attack, and is that the paper's?"""
    ordered = sorted(entries, key=lambda e: e["strength"])
    onset = None  # smallest strength from which every stronger one stops the attack
    for entry in reversed(ordered):
        if not entry["stops_attack"]:
            break
        onset = entry["strength"]
    steps = "; ".join(f"{e['strength']:g}: {_leak_text(e)}" for e in ordered)
    start = "no tested strength stops it" if onset is None else f"stops it from {onset:g} on"
    agrees = all(
        (e["stops_attack"] or e["strength"] < stops_from)
        and (not e["stops_attack"] or e["strength"] >= leaks_below)
        for e in ordered
    )
    return {
        "defense": what,
        "paper": paper,
        "onset": onset,
        "ours": f"{start} ({steps})",
        "agrees": agrees,
    }


def _leak_text(entry: Mapping[str, Any]) -> str:
    m = entry["methods"]
    return "iDLG {} / DLG {} recognisable".format(
        *(_pct(m[x]["fidelity"][key(RECOGNISABLE)]) for x in ("idlg", "dlg"))
    )


def write_all(out: Path, summary: dict[str, Any]) -> None:
    """Write summary.json, defense.png, examples.png (when frames exist) and report.md."""
    write_json(out / "summary.json", summary)
    defend_plot.save_defense_plot(out / "defense.png", summary)
    examples = defend_plot.save_examples(out, summary)
    source = data_source(out, summary["dataset"])
    (out / "report.md").write_text("\n".join(_report_lines(summary, examples, source)) + "\n")


def _report_lines(summary: Mapping[str, Any], examples: bool, source: str) -> list[str]:
    s = summary
    none = baseline_entry(s["entries"])
    baseline = None if none is None else none["accuracy"]
    blind = none is not None and none["stops_attack"]  # nothing to stop
    lines = [
        f"# Defense audit: {s['dataset'].upper()}, DLG and iDLG against each defense",
        "",
        f"Defenses of [{PAPER}]({PAPER_URL}) plus DP-SGD, attacked and trained with.",
        "",
        f"- command: `{s['command']}`",
        f"- N = {s['experiments']} experiments per defense and strength; attacks: "
        f"{s['mode']} mode, {s['iterations']} L-BFGS steps, seed {s['seed']}, "
        f"device {s['device']}",
        f"- data: {source}",
        f"- time: this run's wall time {s['wall_seconds']:.0f} s "
        f"(attacks over all runs of this folder: {s['attack_seconds']:.0f} s)",
        f"- model cost: {s['training']}",
        f"- {s['leak_rule']}",
        "",
        "## At a glance",
        "",
        "Attack success: share of experiments with reconstruction MSE below 1e-2 "
        "(recognisable) / 1e-3 (near-exact). Accuracy: test accuracy of LeNet trained "
        "with the defense (change against no defense).",
        "",
        "| defense | iDLG < 1e-2 / < 1e-3 | DLG < 1e-2 / < 1e-3 | labels iDLG / DLG "
        "| PSNR iDLG | SSIM iDLG | accuracy | epsilon | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in s["entries"]:
        i, d = e["methods"]["idlg"], e["methods"]["dlg"]
        verdict = verdict_text(e, none).replace("stops it", "**stops it**")
        lines.append(
            f"| {e['label']} | {_pair(i)} | {_pair(d)} | {_pct(i['label_accuracy'])} / "
            f"{_pct(d['label_accuracy'])} | {_num(i['psnr_mean'], '.1f')} "
            f"| {_num(i['ssim_mean'], '.2f')} | {_accuracy(e['accuracy'], baseline)} "
            f"| {_epsilon(e)} | {verdict} |"
        )
    if blind:
        lines += ["", INCONCLUSIVE]
    chance = s.get("chance_accuracy")
    if baseline is not None and chance is not None and baseline < 3 * chance:
        lines += [
            "",
            f"The undefended model reached {_pct(baseline)} (chance: {_pct(chance)}): "
            "with the data available offline it learns too little for the accuracy "
            "column to show a defense's cost.",
        ]
    lines += ["", "![defense](defense.png)", ""]
    if examples:
        lines += [
            "Experiment 0, iDLG's reconstruction under each defense:",
            "",
            "![examples](examples.png)",
            "",
        ]
    lines += [
        "## Beside the DLG paper",
        "",
        "| defense | DLG paper | ours | agrees |",
        "|---|---|---|---|",
    ]
    for f in s["findings"]:
        agrees = "inconclusive" if blind else "yes" if f["agrees"] else "**no**"
        lines.append(f"| {f['defense']} | {f['paper']} | {f['ours']} | {agrees} |")
    lines += ["", *NOTES]
    return lines


NOTES = [
    "## How to read it",
    "",
    "- Every experiment is a fresh uniform-init LeNet and a random image, the same under every "
    "defense. Noise strengths are the standard deviation (Gaussian) or scale b (Laplacian) of "
    "the noise added to every gradient entry; the DLG paper's figure labels its levels "
    "'variance'.",
    "- aggregate k: the attacker sees only the mean gradient of k single-example clients "
    "(the same gradient as one client's batch of k). It runs the single-example attack on it "
    "and is scored against whichever of the k images its result is closest to.",
    "- dpsgd: Opacus clips each example's gradient to norm 1 and adds noise of std "
    "sigma (the strength) times that norm. Epsilon is for the training run, at the delta shown "
    "in summary.json. The clipping alone rescales the gradient, which the attacks do not model.",
    "- Label accuracy for iDLG is its sign rule read off the defended gradient.",
    "- MSE 1e-2 is a strict bar for the attacker: a digit under noise can still be read at "
    "MSE 2-5e-2 (see examples.png). 'Stops it' means no reconstruction came within MSE 1e-2, "
    "not that nothing can be seen.",
    "- 'Inconclusive': nothing came within MSE 1e-2 under the defense, but nothing did without "
    "a defense either, so the run cannot tell whether the defense helps.",
]


def verdict_text(entry: Mapping[str, Any], baseline: Mapping[str, Any] | None = None) -> str:
    """ "baseline" for no defense, else whether the defense stopped the attacks.

    A defense under which nothing was recovered is "inconclusive" when the
    undefended `baseline` entry recovered nothing either: such a run cannot
    tell whether the defense helps.
    """
    if entry["defense"] == "none":
        return "baseline"
    if not entry["stops_attack"]:
        return "leaks"
    if baseline is not None and baseline["stops_attack"]:
        return "inconclusive"
    return "stops it"


def baseline_entry(entries: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The undefended ("none") entry, if the run has one."""
    return next((e for e in entries if e["defense"] == "none"), None)


INCONCLUSIVE = (
    "**Inconclusive: the attack did not recover the undefended gradient either, so this "
    "run cannot tell whether the defenses help. Run more iterations (--iterations) or "
    "--improved.**"
)


def _pair(method: Mapping[str, Any]) -> str:
    f = method["fidelity"]
    return f"{_pct(f[key(RECOGNISABLE)])} / {_pct(f[key(EXACT)])}"


def _accuracy(value: float | None, baseline: float | None) -> str:
    if value is None:
        return "n/a"
    if baseline is None:
        return _pct(value)
    return f"{_pct(value)} ({100 * (value - baseline):+.1f})"


def _epsilon(entry: Mapping[str, Any]) -> str:
    if entry["defense"] != "dpsgd":
        return ""
    return "inf" if entry["epsilon"] is None else f"{entry['epsilon']:.3g}"


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.0f}%"


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
