"""The improved batch attack (`gradleak attack --batch-size B --improved`) on seeded batches.

Attacks the same seeded CIFAR-100 batches (B images drawn without
replacement from the test set, model and dummy seeded by the batch's number)
with two source trees side by side: by default this checkout's and another
commit's (`git worktree add ../wt-old COMMIT`), each in its own process with
one thread, started together so that both see the same load.  A batch counts
as recovered when every image, matched to its original by the attack's own
metrics, has MSE below `--threshold` (1e-2).

    python bench/improved_batches.py --data-dir ../shared/data \\
        --sources now=src,old=../wt-old/src --batches 32 --batch-sizes 2,4,8 --iterations 60

Each process runs `gradleak.experiments.attack.run_attack` (present at both
commits) in a loop; the driver prints one table of shares and MSE medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def batch(size: int, number: int, total: int) -> tuple[int, ...]:
    """Batch `number` of size `size`: distinct test images, fixed by (size, number)."""
    import numpy as np

    rng = np.random.default_rng([size, number])
    return tuple(int(i) for i in rng.choice(total, size=size, replace=False))


def worker(args: argparse.Namespace) -> None:
    """Attack every batch with the gradleak found on sys.path; one JSON line each."""
    import torch

    from gradleak.experiments.attack import AttackRun, run_attack

    torch.set_num_threads(1)
    out = tempfile.mkdtemp(prefix="gradleak-bench-improved-")
    for size in (int(s) for s in args.batch_sizes.split(",")):
        for number in range(args.batches):
            run = AttackRun(
                dataset="cifar100",
                data_dir=args.data_dir,
                indices=batch(size, number, args.total),
                improved=True,
                seed=number,
                iterations=args.iterations,
                out=out,
            )
            started = time.perf_counter()
            metrics = run_attack(run)
            row = {
                "batch_size": size,
                "batch": number,
                "per_image_mse": metrics["per_image_mse"],
                "labels_correct": metrics["labels_correct"],
                "seconds": round(time.perf_counter() - started, 2),
            }
            print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--sources", default="now=src", help="NAME=SRC_DIR,...")
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--batch-sizes", default="2,4,8")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--threshold", type=float, default=1e-2)
    parser.add_argument("--total", type=int, default=916, help="images in the test set")
    parser.add_argument("--out", default=None, help="folder for each source's lines")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    root = Path(args.out or tempfile.mkdtemp(prefix="gradleak-bench-improved-"))
    root.mkdir(parents=True, exist_ok=True)
    sources = dict(part.split("=", 1) for part in args.sources.split(","))
    procs = {}
    for name, src in sources.items():
        env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "OMP_NUM_THREADS": "1"}
        command = [sys.executable, __file__, "--worker", "--data-dir", args.data_dir,
                   "--batches", str(args.batches), "--batch-sizes", args.batch_sizes,
                   "--iterations", str(args.iterations), "--total", str(args.total)]  # fmt: skip
        with open(root / f"{name}.jsonl", "w") as lines:
            procs[name] = subprocess.Popen(command, env=env, stdout=lines)
    for name, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"{name} failed (exit {proc.returncode})")
    print_table(args, root, list(sources))


def print_table(args: argparse.Namespace, root: Path, names: list[str]) -> None:
    print(f"{args.batches} batches per B, CIFAR-100, LeNet, --improved, --iterations "
          f"{args.iterations}; recovered: every image MSE < {args.threshold:g}")  # fmt: skip
    print("| B | source | recovered | labels right | median of mean MSE | median seconds |")
    print("|---|---|---|---|---|---|")
    rows = {n: [json.loads(line) for line in (root / f"{n}.jsonl").read_text().splitlines()]
            for n in names}  # fmt: skip
    for size in (int(s) for s in args.batch_sizes.split(",")):
        for name in names:
            kept = [r for r in rows[name] if r["batch_size"] == size]
            won = sum(max(r["per_image_mse"]) < args.threshold for r in kept)
            labels = sum(bool(r["labels_correct"]) for r in kept)
            mse = statistics.median(statistics.fmean(r["per_image_mse"]) for r in kept)
            seconds = statistics.median(r["seconds"] for r in kept)
            print(f"| {size} | {name} | {won}/{len(kept)} | {labels}/{len(kept)} | "
                  f"{mse:.2e} | {seconds:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
