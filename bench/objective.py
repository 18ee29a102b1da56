"""The three ways to evaluate many victims' matching objective, side by side.

vmapped (torch.func over one victim's objective: the general path and the
reference), stacked autograd (layered.py: weights stacked on a leading axis,
autograd twice) and explicit (explicit.py: both derivatives written out,
grouped convolutions, the last layer from its outer-product structure).
Same victims, same points; each cell is the median of `--repeats` calls, the
three paths taking turns so that a slow spell of the machine hits all three.

    .venv/bin/python bench/objective.py --dataset mnist
    .venv/bin/python bench/objective.py --dataset cifar100

Needs the real data (GRADLEAK_DATA or ../shared/data).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from engine import victims

from gradleak import IDLG
from gradleak.attacks.objective import BatchedObjective

PATHS = ("vmapped", "stacked", "explicit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "cifar100", "lfw"])
    parser.add_argument("--victims", default="1,4,16,32", help="victims per call")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = [int(v) for v in args.victims.split(",")]
    observations, _ = victims(args.dataset, max(counts), 0)
    attack = IDLG()
    all_labels = torch.stack([attack.infer_labels(o).reshape(-1) for o in observations])
    print(f"iDLG matching objective, {args.dataset}, float32, 1 thread, torch {torch.__version__}")
    print("| victims | vmapped (ms/victim) | stacked autograd | explicit | explicit speed-up "
          "over vmapped / stacked |\n|---|---|---|---|---|")  # fmt: skip
    for count in counts:
        objective = BatchedObjective(observations[:count], all_labels[:count], torch.float32)
        z = torch.rand(count, objective.size, generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {name: [] for name in PATHS}
        for _ in range(3):  # warm-up
            for path in PATHS:
                objective.use(path)
                objective(z)
        for _ in range(args.repeats):
            for path in PATHS:
                objective.use(path)
                start = time.perf_counter()
                objective(z)
                times[path].append(time.perf_counter() - start)
        ms = {name: 1000 * statistics.median(t) / count for name, t in times.items()}
        print(f"| {count} | {ms['vmapped']:.3f} | {ms['stacked']:.3f} | "
              f"{ms['explicit']:.3f} | {ms['vmapped'] / ms['explicit']:.2f}x / "
              f"{ms['stacked'] / ms['explicit']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
