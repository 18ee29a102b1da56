"""`gradleak flower-demo --task text` under a few settings: which rounds leak, side by side.

Each setting runs the command a user types (a real Flower simulation on Ray, then the text
audit) in its own process, and the table puts the rounds side by side: sentences rebuilt
exactly per round (over all clients), mean token accuracy, the Flower simulation's seconds
and the whole command's.

    .venv/bin/python bench/flower_text.py                 # the settings below, 4 clients
    .venv/bin/python bench/flower_text.py --only 0,1      # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = [
    ("(defaults)", []),
    ("--local-steps 1", ["--local-steps", "1"]),
    ("--lr 0.05", ["--lr", "0.05"]),
    ("--batch-size 2", ["--batch-size", "2"]),
    ("--batch-size 2 --lora-rank 64", ["--batch-size", "2", "--lora-rank", "64"]),
    ("--model gpt2-small", ["--model", "gpt2-small"]),
    (
        "--model gpt2-small --batch-size 2 --lora-rank 64",
        ["--model", "gpt2-small", "--batch-size", "2", "--lora-rank", "64"],
    ),
]


def run(extra: list[str], clients: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "demo"
        command = [sys.executable, "-m", "gradleak.cli", "flower-demo", "--task", "text",
                   "--clients", str(clients), "--out", str(out), *extra]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1:], "seconds": seconds}
        result = json.loads((out / "text-leakage.json").read_text())
        demo = json.loads((out / "captures" / "demo.json").read_text())
        return {
            "entries": result["entries"],
            "simulation": demo["simulation_seconds"],
            "seconds": seconds,
        }


def row(name: str, found: dict) -> str:
    if "error" in found:
        return f"| `{name}` | error: {found['error']} |"
    rounds = sorted({e["round"] for e in found["entries"]})
    cells = []
    for rnd in rounds:
        entries = [e for e in found["entries"] if e["round"] == rnd]
        exact = sum(e.get("exact_count", 0) for e in entries)
        total = sum(len(e["truth"] or []) for e in entries)
        accuracy = sum(e.get("token_accuracy", 0.0) for e in entries) / len(entries)
        cells.append(f"{exact}/{total} ({100 * accuracy:.0f}%)")
    return (
        f"| `{name}` | {' | '.join(cells)} | {found['simulation']:.0f} s | "
        f"{found['seconds']:.0f} s |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--only", default=None, help="indices of SETTINGS, e.g. 0,3")
    args = parser.parse_args()
    chosen = SETTINGS
    if args.only:
        chosen = [SETTINGS[int(i)] for i in args.only.split(",")]
    print(
        "| options | round 1 exact (token acc.) | round 2 | round 3 | Flower simulation "
        "| whole command |"
    )
    print("|---|---|---|---|---|---|")
    for name, extra in chosen:
        print(row(name, run(extra, args.clients)), flush=True)


if __name__ == "__main__":
    main()
