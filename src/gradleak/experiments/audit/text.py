"""The audit of a captured federated LoRA fine-tuning run: every client's sentences, rebuilt.

For a capture whose header holds a ``text_model`` (`flower-demo --task text`,
or any app that passes ``LeakageAudit(..., text_model=spec.to_json())``), it
rebuilds the seeded decoder and its LoRA adapters from that spec, then for
every round and client reads the adapters sent and returned from disk, turns
them into what the server holds (an `UpdateObservation`: the update and the
local learning rate and steps of the train config sent) and runs the span
attack (DAGER-class, update mode) on it.  Where the client's own sentences
lie beside the capture (``private/round-NNNN/node-<id>.json``, the demo's
ground truth) each row is scored: sentences rebuilt exactly, the exact share,
ROUGE-1/2 and token accuracy (`experiments.text.batch.score`).

Writes ``OUT/report.md`` and ``OUT/text-leakage.json``.

Why the span attack is run with other tolerances than on a one-step
gradient (`TEXT_SPAN`): LoRA's A update of a client is ``lr * sum_k (dY_k
B_k)^T X``; with B trained from zero over a few rounds, ``B`` is small and far
from isotropic, so the update's singular values spread over several decades,
and the default cut (1e-4 of the largest) drops inputs that are in the batch;
and over K local steps at the demo's learning rate the second block's inputs
drift (its adapters move), so true prefixes lie up to about 0.03 from its
span (wrong extensions 0.2 or more, measured on gpt2-tiny): the threshold is
0.1.

One sequence from the first block alone: with learned positions (GPT-2), when
every position has exactly one candidate token, the batch's sequences agree
at every position, so the longest of them is those candidates in order (the
second block only pairs tokens into sequences).  This is what recovers a
one-sentence client in round 1, where fresh adapters (B = 0) leave the second
block's update too weak to check prefixes (measured: true prefixes 0.3-0.5
from its span, wrong ones 0.4-0.5).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradleak.attacks.span import SpanAttack, SpanConfig
from gradleak.errors import AttackNotApplicable, DataError
from gradleak.experiments.flower_demo.text_task import (
    TEXT_SPEC_KEY,
    TextModelSpec,
    base_model,
    load_adapters,
    lora_model,
    read_private_sentences,
)
from gradleak.experiments.text.batch import score
from gradleak.integrations.reader import (
    Capture,
    Exchange,
    load_arrays,
    read_capture,
    read_exchanges,
)
from gradleak.models.text_lm import encode_batch
from gradleak.outdir import prepare_out
from gradleak.types import UpdateObservation

ProgressCallback = Callable[[str, float, int], None]
TEXT_RESULTS = "text-leakage.json"
# See the module docstring: the update's spectrum is wide, the float32 noise below it.
TEXT_SPAN = SpanConfig(update_rank_tolerance=1e-6, update_scale=100.0)


@dataclass(frozen=True)
class TextAuditResult:
    """The rows (one per round and client), and the sidecars refused, one line each."""

    summary: dict[str, Any]
    problems: tuple[str, ...]


def is_text_capture(captures: str | Path) -> bool:
    """Whether the capture's header names a text model (then the text audit applies)."""
    return read_capture(captures).text_model is not None


def run_text_audit(
    captures: str | Path,
    out: str | Path,
    *,
    command: str = "",
    callback: ProgressCallback | None = None,
) -> TextAuditResult:
    """Attack every client's adapter update of every round; write report.md and the JSON.

    Raises:
        DataError: No capture there, or a header without a sound text model spec.
    """
    capture = read_capture(captures)
    where = f"{captures}/capture.json"
    if capture.text_model is None:
        raise DataError(f"{where} names no {TEXT_SPEC_KEY}: not a capture of LoRA fine-tuning")
    spec = TextModelSpec.from_json(capture.text_model, where)
    exchanges, refused = read_exchanges(capture)
    folder = prepare_out(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread each: the demo's machine is shared (and small)
    try:
        lm = base_model(spec)
        rows = []
        if callback is not None:
            callback("span attack", 0, len(exchanges))
        for done, exchange in enumerate(exchanges, start=1):
            rows.append(_audit_one(capture, spec, lm, exchange))
            if callback is not None:
                callback("span attack", done, len(exchanges))
    finally:
        torch.set_num_threads(threads)
    problems = tuple(f"{r.sidecar}: {r.reason}" for r in refused)
    summary = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "text_model": spec.to_json(),
        "span_config": {
            "update_rank_tolerance": TEXT_SPAN.update_rank_tolerance,
            "threshold": TEXT_SPAN.layer2_threshold * TEXT_SPAN.update_scale,
        },
        "entries": rows,
        "refused": list(problems),
    }
    (folder / TEXT_RESULTS).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(text_report(summary), encoding="utf-8")
    return TextAuditResult(summary, problems)


def _audit_one(capture: Capture, spec: TextModelSpec, lm: Any, exchange: Exchange) -> dict:
    row: dict[str, Any] = {
        "round": exchange.round, "node_id": exchange.node_id,
        "num_examples": exchange.num_examples, "error": exchange.error,
    }  # fmt: skip
    try:
        truth = read_private_sentences(capture.folder, exchange.round, exchange.node_id)
    except DataError as error:  # a broken ground-truth file: the row is audited, not scored
        truth, row["truth_error"] = None, str(error)
    row["truth"] = truth
    if exchange.error is not None or exchange.reply is None:
        row["error"] = exchange.error or "the reply holds no arrays"
        return row
    what = exchange.sidecar
    try:
        sent = _one_record(load_arrays(capture, exchange.sent, f"{what} (sent)"), what)
        returned = _one_record(load_arrays(capture, exchange.reply, f"{what} (reply)"), what)
        lr, steps = _schedule(capture, exchange)
        model = lora_model(spec, lm)
        load_adapters(model, sent, f"{what} (sent)")
        names = tuple(n for n, p in model.named_parameters() if p.requires_grad)
        if set(returned) != set(names):
            raise DataError(f"{what}: the reply does not hold the adapters that were sent")
        before = {n: torch.as_tensor(np.asarray(sent[n])) for n in names}
        after = {n: torch.as_tensor(np.asarray(returned[n])) for n in names}
        if not all(bool(torch.isfinite(after[n]).all()) for n in names):
            raise DataError(f"{what}: the reply's adapters hold NaN or inf; nothing to attack")
        width = int(lm.model.config.hidden_size)
        observation = UpdateObservation(
            model=model, sent=before, returned=after,
            update=tuple(after[n] - before[n] for n in names), parameter_names=names,
            input_shape=(lm.max_length, width),
            num_classes=int(lm.model.get_input_embeddings().weight.shape[0]),
            num_examples=int(exchange.num_examples or 1), local_lr=lr, local_steps=steps,
        )  # fmt: skip
        row["b_sent_zero"] = all(float(before[n].abs().max()) == 0 for n in names if "lora_B" in n)
        eos = int(lm.tokenizer.eos_token_id)
        found = SpanAttack(TEXT_SPAN)(observation, eos=eos)
    except (DataError, AttackNotApplicable) as error:
        row["error"] = str(error)
        return row
    single = first_block_sequence(found.candidates, eos) if found.applicable else None
    if single is not None and single not in found.sequences:
        # Every position has one candidate: see the module docstring.
        found = replace(found, sequences=(single,))
        row["from_first_block"] = True
    row.update({
        "rank": found.rank, "applicable": found.applicable, "reason": found.reason,
        "seconds": round(found.seconds, 3), "recovered_count": len(found.sequences),
        "recovered": [lm.decode(s).strip() for s in found.sequences],
        "lr": lr, "local_steps": steps,
    })  # fmt: skip
    if truth:
        scored = score(lm, encode_batch(lm, truth).sequences(), list(found.sequences))
        row.update({k: scored[k] for k in ("exact", "token_accuracy", "rouge1", "rouge2")})
        row["exact_count"] = sum(s["exact"] for s in scored["sentences"])
        row["sentences"] = scored["sentences"]
    return row


def first_block_sequence(
    candidates: tuple[tuple[int, ...], ...], eos: int
) -> tuple[int, ...] | None:
    """The one sequence the first block's candidates spell, when every position has exactly
    one (learned positions only: a rotary model's candidates are one position-free set)."""
    if len(candidates) < 2 or any(len(c) != 1 for c in candidates):
        return None
    return tuple(c[0] for c in candidates) + (eos,)


def _one_record(records: dict[str, dict[str, np.ndarray]], what: str) -> dict[str, np.ndarray]:
    if len(records) != 1:
        raise DataError(f"{what}: expected one array record (the adapters), got {len(records)}")
    return next(iter(records.values()))


def _schedule(capture: Capture, exchange: Exchange) -> tuple[float, int]:
    """The local learning rate and steps of the train config sent (Flower leaves the keys to
    the app: the capture's schedule keys name them)."""
    keys = capture.schedule
    values: dict[str, Any] = {}
    for record in exchange.config.values():
        values |= record
    lr, steps = values.get(keys.lr), values.get(keys.local_steps, 1)
    if not isinstance(lr, int | float) or isinstance(lr, bool) or not lr > 0:
        raise DataError(
            f"{exchange.sidecar}: the train config sent holds no learning rate '{keys.lr}'"
        )
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise DataError(f"{exchange.sidecar}: '{keys.local_steps}' is not a step count")
    return float(lr), steps


def text_verdict(summary: dict[str, Any]) -> list[str]:
    """A line per round: how many clients' sentences came back, exactly."""
    lines = []
    rounds = sorted({e["round"] for e in summary["entries"]})
    for rnd in rounds:
        entries = [e for e in summary["entries"] if e["round"] == rnd]
        scored = [e for e in entries if "exact" in e]
        rebuilt = sum(len(e.get("recovered") or []) for e in entries)
        if not scored and rebuilt:
            lines.append(
                f"round {rnd}: {rebuilt} sentences rebuilt from {len(entries)} clients' adapter "
                "updates (no ground truth beside the capture to score them)"
            )
            continue
        if not scored:
            errors = [e.get("error") or e.get("reason") for e in entries]
            lines.append(f"round {rnd}: nothing rebuilt ({errors[0] if errors else 'no client'})")
            continue
        exact = sum(e["exact_count"] for e in scored)
        total = sum(len(e["truth"]) for e in scored)
        lines.append(
            f"round {rnd}: {exact} of {total} private sentences rebuilt exactly from "
            f"{len(scored)} clients' adapter updates"
        )
    return lines


def text_report(summary: dict[str, Any]) -> str:
    spec = summary["text_model"]
    lines = [
        "# What the server rebuilt from the clients' LoRA updates",
        "",
        *[f"- {line}" for line in text_verdict(summary)],
        "",
        f"Model: {spec['name']} (seed {spec['seed']}), LoRA rank {spec['lora_rank']}, alpha "
        f"{spec['lora_alpha']:g} on {', '.join(spec['targets'])}; tokenizer {spec['tokenizer']}. "
        "Attack: the span attack (DAGER-class) on each client's adapter update, update mode, "
        f"rank tolerance {summary['span_config']['update_rank_tolerance']:g}, span distance "
        f"threshold {summary['span_config']['threshold']:g}.",
        "",
    ]
    if summary.get("command"):
        lines += [f"Command: `{summary['command']}` ({summary['date']})", ""]
    lines += [
        "| round | node | sentences | rebuilt exactly | exact share | ROUGE-1 | ROUGE-2 "
        "| token acc. | update rank | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary["entries"]:
        node = f"...{str(e['node_id'])[-6:]}"
        n = len(e["truth"]) if e.get("truth") else e.get("num_examples") or "?"
        note = e.get("error") or e.get("reason") or ""
        if e.get("from_first_block"):
            note = "; ".join(
                x for x in ("first block alone (one candidate per position)", note) if x
            )
        if e.get("b_sent_zero"):
            note = "; ".join(x for x in ("fresh adapters sent (B = 0)", note) if x)
        if "exact" in e:
            cells = [
                f"{e['exact_count']}/{n}", f"{e['exact']:.2f}", f"{100 * e['rouge1']:.1f}",
                f"{100 * e['rouge2']:.1f}", f"{100 * e['token_accuracy']:.1f}",
            ]  # fmt: skip
        else:
            cells = ["-", "-", "-", "-", "-"]
        lines.append(
            f"| {e['round']} | {node} | {n} | {' | '.join(cells)} | {e.get('rank', '-')} "
            f"| {note.replace('|', '/')} |"
        )
    lines += ["", "## Sentences, per round and client", ""]
    for e in summary["entries"]:
        lines.append(f"### round {e['round']}, node ...{str(e['node_id'])[-6:]}")
        lines.append("")
        for s in e.get("sentences", []):
            mark = "exact" if s["exact"] else f"token acc. {100 * s['token_accuracy']:.0f}%"
            lines.append(f"- private: {s['original']}")
            lines.append(f"  - rebuilt ({mark}): {s['recovered'] or '(nothing)'}")
        if "sentences" not in e:
            for text in e.get("recovered", []):
                lines.append(f"- rebuilt: {text}")
            if not e.get("recovered"):
                lines.append(f"- nothing rebuilt: {e.get('error') or e.get('reason') or ''}")
        lines.append("")
    if summary.get("refused"):
        lines += ["## Refused", "", *[f"- {p}" for p in summary["refused"]], ""]
    return "\n".join(lines)
