"""Batched products of a linear layer: the plain form against the one explicit.py uses.

A linear layer's products have one column per example, so each victim's is a
matrix times a vector.  `_product` in attacks/lowrank.py computes them as a
vector times a transposed matrix (the explicit objective no longer forms an
outer product: lowrank.py).  This times both forms, side by side,
on LeNet's last layers (median of `--repeats` calls, 1 thread).

    .venv/bin/python bench/products.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from gradleak.attacks.lowrank import _product

# (victims, classes, features): CIFAR-100, MNIST and LFW LeNets' last layers.
LAYERS = [(16, 100, 768), (32, 10, 588), (4, 5749, 768)]


def median_us(call: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, float32, microseconds per call")
    print("| layer (victims x classes x features) | product | bmm | explicit.py | speed-up |")
    print("|---|---|---|---|---|")
    for victims, classes, features in LAYERS:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(victims, classes, features, generator=g)
        x = torch.randn(victims, features, 1, generator=g)
        e = torch.randn(victims, classes, 1, generator=g)
        cases = {
            "W @ x": (w, x),
            "W^T @ e": (w.transpose(1, 2), e),
        }
        for name, (a, b) in cases.items():
            torch.testing.assert_close(_product(a, b), torch.bmm(a, b), rtol=1e-4, atol=1e-3)
            plain = median_us(lambda a=a, b=b: torch.bmm(a, b), args.repeats)
            ours = median_us(lambda a=a, b=b: _product(a, b), args.repeats)
            print(f"| {victims} x {classes} x {features} | {name} | {plain:.0f} | {ours:.0f} | "
                  f"{plain / ours:.1f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
