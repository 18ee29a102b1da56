"""Memory per victim of the batched engine: CIFAR-100 against LFW, both modes.

Each case runs in a fresh process: it builds its victims (the observations:
model and shared gradient, which the caller holds whatever the engine does),
then samples the process's resident memory every 2 ms while `attack_batch`
runs.  The engine's memory per victim is the peak above the level before the
attack, divided by the victims.  Faithful runs take 6 L-BFGS steps (120
evaluations), enough to fill the 100 curvature pairs each victim keeps;
improved runs run as in `gradleak reproduce` (closed-form start).

    .venv/bin/python bench/memory.py
    .venv/bin/python bench/memory.py --victims 32 --datasets cifar100,lfw

Needs the real data (GRADLEAK_DATA or ../shared/data).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def measure(dataset: str, method: str, mode: str, count: int) -> dict:
    """Run one case in this process; returns the engine's peak bytes above the start."""
    import torch
    from engine import victims

    from gradleak import build_attack
    from gradleak.attacks.engine import attack_batch

    torch.set_num_threads(1)
    observations, _ = victims(dataset, count, 0)
    overrides = {"iterations": 6} if mode == "faithful" else {}
    attack = build_attack(method, improved=mode == "improved", **overrides)
    before = rss_bytes()
    peak = [before]
    running = [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample)
    thread.start()
    start = time.perf_counter()
    attack_batch(attack, observations, list(range(count)))
    seconds = time.perf_counter() - start
    running[0] = False
    thread.join()
    peak[0] = max(peak[0], rss_bytes())
    return {"bytes_per_victim": (peak[0] - before) / count, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="cifar100,lfw")
    parser.add_argument("--victims", type=int, default=16)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case
    args = parser.parse_args()
    if args.case:
        dataset, method, mode = args.case.split(":")
        print(json.dumps(measure(dataset, method, mode, args.victims)))
        return
    here = Path(__file__).resolve().parent
    results = {}
    for mode in ("faithful", "improved"):
        for method in ("idlg", "dlg"):
            for dataset in args.datasets.split(","):
                case = f"{dataset}:{method}:{mode}"
                out = subprocess.run(
                    [sys.executable, str(here / "memory.py"), "--case", case,
                     "--victims", str(args.victims)],
                    capture_output=True, text=True, check=True, cwd=here,
                )  # fmt: skip
                results[(mode, method, dataset)] = json.loads(out.stdout.splitlines()[-1])
    datasets = args.datasets.split(",")
    print(f"batched engine, {args.victims} victims per case, MB per victim above the "
          "observations")  # fmt: skip
    print("| mode | method | " + " | ".join(datasets) + " | ratio |")
    print("|---|---|" + "---|" * len(datasets) + "---|")
    for mode in ("faithful", "improved"):
        for method in ("idlg", "dlg"):
            sizes = [results[(mode, method, d)]["bytes_per_victim"] / 2**20 for d in datasets]
            ratio = f"{sizes[-1] / sizes[0]:.2f}x" if len(sizes) > 1 else "-"
            cells = " | ".join(f"{s:.1f}" for s in sizes)
            print(f"| {mode} | {method} | {cells} | {ratio} |")


if __name__ == "__main__":
    main()
