"""LFW's marginal cost per improved iDLG experiment against CIFAR-100's.

Runs `gradleak reproduce idlg --mode improved --workers 1` end to end (the CLI
as a user runs it) at two sizes per dataset, into fresh folders, and divides
the extra wall time by the extra experiments: the process start, the data
loading and the report drop out, leaving what one more experiment costs.
Also prints the gradient evaluations the attacks used (a closed-form start
that lands on the image needs one per attack).

    python bench/idlg_marginal.py --data-dir ../shared/data --seed 1 --small 100 --large 300
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATASETS = ("cifar100", "lfw")


def run(data_dir: str, dataset: str, experiments: int, seed: int, out: Path) -> tuple[float, int]:
    """Wall seconds of one reproduction and the evaluations its attacks used."""
    command = [sys.executable, "-m", "gradleak.cli", "reproduce", "idlg", "--dataset", dataset,
               "--data-dir", data_dir, "--experiments", str(experiments), "--mode", "improved",
               "--seed", str(seed), "--workers", "1", "--out", str(out)]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return seconds, sum(int(row["evaluations"]) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=300)
    args = parser.parse_args()
    marginal = {}
    print("| dataset | experiments | seconds | evaluations |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for dataset in DATASETS:
            seconds = {}
            for size in (args.small, args.large):
                out = Path(scratch) / f"{dataset}-{size}"
                seconds[size], evaluations = run(args.data_dir, dataset, size, args.seed, out)
                print(f"| {dataset} | {size} | {seconds[size]:.1f} | {evaluations} |", flush=True)
            extra = args.large - args.small
            marginal[dataset] = (seconds[args.large] - seconds[args.small]) / extra
    print()
    for dataset in DATASETS:
        print(f"{dataset}: {marginal[dataset]:.3f} s per experiment")
    print(f"LFW / CIFAR-100: {marginal['lfw'] / marginal['cifar100']:.2f}x")


if __name__ == "__main__":
    main()
