"""The span attack (DAGER-class) on a GPT-2-small-shaped decoder: full, LoRA, local steps.

Each setting runs `gradleak attack-text` in its own process (so that its peak resident
memory is its own) on the first B of the package's sentences, and the table puts them side
by side: share of sentences exact, attack seconds, the client's step, peak memory, the
first block's gradient rank, and the attack's time against the full fine-tuning row.

    .venv/bin/python bench/text_span.py                       # the settings below
    .venv/bin/python bench/text_span.py --layers 2 --quick    # a fast look
    .venv/bin/python bench/text_span.py --lora-sweep          # LoRA rank 8-64, B = 1, 2, 16
    .venv/bin/python bench/text_span.py --encoder             # BERT-base B = 2-16: the search
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = [
    ("full, FedSGD", "gpt2-small", 16, []),
    ("LoRA r=8, FedSGD", "gpt2-small", 16, ["--lora-rank", "8"]),
    ("LoRA r=256, FedSGD", "gpt2-small", 16, ["--lora-rank", "256"]),
    ("full, 3 local steps lr 1e-3", "gpt2-small", 16, ["--local-steps", "3", "--local-lr", "1e-3"]),
    ("full, FedSGD", "gpt2-small", 64, []),
    ("full, FedSGD", "llama-small", 8, []),
    ("full, FedSGD", "bert-base", 1, []),
]
QUICK = [SETTINGS[0], SETTINGS[1], SETTINGS[2]]
# `--lora-sweep`: what the adapter's rank lets through, at small B x length and at B = 16.
LORA_SWEEP = [
    (f"LoRA r={rank}, FedSGD", "gpt2-small", batch, ["--lora-rank", str(rank)])
    for batch in (1, 2, 16)
    for rank in (8, 16, 32, 64)
]

# `--encoder`: the encoder's combination search on a BERT-base-shaped model, full FedSGD.
ENCODER = [("full, FedSGD", "bert-base", batch, []) for batch in (2, 4, 8, 16)]


def run(model: str, batch: int, extra: list[str], layers: int | None) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "gradleak.cli", "attack-text", "--model", model,
                   "--batch-size", str(batch), "--method", "span", "--no-fallback",
                   "--device", "cpu", "--out", folder, *extra]  # fmt: skip
        if layers is not None:
            command += ["--layers", str(layers)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
        return json.loads((Path(folder) / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="depth (the models' own)")
    parser.add_argument("--quick", action="store_true", help="the first three settings only")
    parser.add_argument(
        "--lora-sweep", action="store_true", help="LoRA rank 8-64 at B = 1, 2 and 16 instead"
    )
    parser.add_argument(
        "--encoder", action="store_true", help="bert-base at B = 2, 4, 8, 16 instead (ROUGE)"
    )
    args = parser.parse_args()
    rows = []
    settings = LORA_SWEEP if args.lora_sweep else QUICK if args.quick else SETTINGS
    settings = ENCODER if args.encoder else settings
    for label, model, batch, extra in settings:
        metrics = run(model, batch, extra, args.layers)
        span = metrics["methods"]["span"]
        rows.append((label, metrics, span))
        print(f"done: {model} B={batch} {label}", file=sys.stderr)
    if args.encoder:
        encoder_table(rows)
        return
    base = next((r[2]["seconds"] for r in rows if r[2]["seconds"]), 1.0)  # first applicable
    print("| model | width x layers | B | max tokens | setting | exact | attack s | x full | "
          "client s | peak MB | rank / width | note |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, m, span in rows:
        note = "" if span["applicable"] else "span full: not applicable"
        print(
            f"| {m['model']} | {m['width']} x {m['layers']} | {m['batch_size']} | "
            f"{m['max_tokens']} | {label} | {100 * span['exact']:.0f}% | {span['seconds']:.1f} | "
            f"{ratio(span['seconds'], base, args.lora_sweep)} | {m['client_seconds']:.1f} | "
            f"{m['peak_rss_mb']:.0f} | "
            f"{span['rank']} / {span['width']} | {note} |"
        )


def encoder_table(rows: list[tuple[str, dict, dict]]) -> None:
    """Sequences found (each checked) and the scores, not-found sentences left empty."""
    print(
        "| model | width x layers | B | max tokens | setting | found / B | exact | ROUGE-1 | "
        "ROUGE-2 | token acc. | starts | attack s | client s | peak MB | rank / width |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, m, span in rows:
        print(
            f"| {m['model']} | {m['width']} x {m['layers']} | {m['batch_size']} | "
            f"{m['max_tokens']} | {label} | {span['recovered_count']} / {m['batch_size']} | "
            f"{100 * span['exact']:.0f}% | {100 * span['rouge1']:.1f} | "
            f"{100 * span['rouge2']:.1f} | {span['token_accuracy']:.3f} | "
            f"{span.get('search_starts', 0)} | {span['seconds']:.1f} | "
            f"{m['client_seconds']:.1f} | {m['peak_rss_mb']:.0f} | "
            f"{span['rank']} / {span['width']} |"
        )


def ratio(seconds: float, base: float, sweep: bool) -> str:
    """The attack's time against the full fine-tuning row; none in the LoRA sweep (no such row)."""
    return "-" if sweep else f"{seconds / base:.2f}x"


if __name__ == "__main__":
    main()
