"""One matching evaluation per victim against this CPU's limit for the work.

The limit: single-thread GEMM throughput from torch (``torch.mm`` of two
512 x 512 float32 matrices), and the multiply-adds of one evaluation of the
explicit objective counted from the layer shapes (below).  LFW's last layer
is streamed from memory four times per evaluation (each victim's 5,749 x 768
weights fit no cache), so it also gets a bandwidth bound: those bytes over the
rate of a float32 GEMV on such a matrix.  GEMM, GEMV and the evaluation take
turns, round after round, so a busy spell of a shared machine hits all of them;
each figure is a median over the rounds.

    .venv/bin/python bench/flops.py                  # MNIST, CIFAR-100, LFW
    .venv/bin/python bench/flops.py --datasets mnist --victims 32 --rounds 30

Counting (per example; B examples multiply everything): a convolution's
forward is ``O * C * k * k * h * w`` multiply-adds.  The evaluation runs it
(forward), its weight gradient and input gradient (backward), two
convolutions in stage A (``a`` with ``R``, the previous stage's derivative
with ``W``) and two input gradients in stage B (through ``W`` and ``R``): 7
times, 5 for the first block (no input gradient, no second stage-A term).  A
linear layer's ``O * F`` runs 4 times (``W h``, ``W^T e``, ``W v``, ``W^T
w``), 3 for a first block; the structured terms (lowrank.py) are ``O(O + F)``
and left out, as are element-wise ops and the softmax.  FLOPs = 2 x
multiply-adds.

Needs the real data (GRADLEAK_DATA or ../shared/data).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from engine import victims

from gradleak import IDLG
from gradleak.attacks.objective import BatchedObjective


def evaluation_macs(objective: BatchedObjective) -> tuple[int, int]:
    """Multiply-adds of one evaluation per victim: (all, those of linear layers)."""
    layers = objective._explicit_all.layers  # type: ignore[union-attr]
    shape = objective.input_shape
    total = linear = 0
    for i, layer in enumerate(layers):
        block = layer.block
        if block.kind == "conv":
            out_channels, channels, kh, kw = layer.per_victim(layer.weight).shape[1:]
            (sh, sw), (ph, pw) = block.stride, block.padding
            rows = (shape[1] + 2 * ph - kh) // sh + 1
            cols = (shape[2] + 2 * pw - kw) // sw + 1
            forward = out_channels * channels * kh * kw * rows * cols
            total += forward * (5 if i == 0 else 7)
            shape = (out_channels, rows, cols)
        else:
            outputs, features = layer.weight.shape
            passes = 3 if i == 0 else 4
            total += outputs * features * passes
            linear += outputs * features * passes
            shape = (outputs, 1, 1)
    return total * objective.batch_size, linear * objective.batch_size


def gemm_rate(size: int = 512) -> float:
    """GFLOP/s of one ``torch.mm`` of two ``size`` x ``size`` float32 matrices."""
    a, b = torch.rand(size, size), torch.rand(size, size)
    start = time.perf_counter()
    torch.mm(a, b)
    return 2 * size**3 / (time.perf_counter() - start) / 1e9


def gemv_rate(matrices: list[torch.Tensor]) -> float:
    """GB/s of float32 matrix-times-vector products over `matrices` (one pass each)."""
    x = torch.rand(matrices[0].shape[1], 1)
    start = time.perf_counter()
    for m in matrices:
        m @ x
    seconds = time.perf_counter() - start
    return sum(m.numel() * m.element_size() for m in matrices) / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="mnist,cifar100,lfw")
    parser.add_argument("--victims", type=int, default=32, help="victims per evaluation")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"explicit objective, iDLG, float32, 1 thread, torch {torch.__version__}; "
          f"{args.victims} victims per call, median of {args.rounds} rounds")  # fmt: skip
    print("| dataset | MFLOP/victim | GEMM GFLOP/s | limit (ms/victim) | measured (ms/victim) "
          "| achieved GFLOP/s | measured / limit | bandwidth bound (ms/victim) |")  # fmt: skip
    print("|---" * 8 + "|")
    for dataset in args.datasets.split(","):
        observations, _ = victims(dataset, args.victims, 0)
        labels = torch.stack([IDLG().infer_labels(o).reshape(-1) for o in observations])
        objective = BatchedObjective(observations, labels, torch.float32)
        z = torch.rand(
            len(observations), objective.size, generator=torch.Generator().manual_seed(0)
        )
        macs, linear_macs = evaluation_macs(objective)
        last = [dict(o.model.named_parameters())["fc.weight"].detach() for o in observations]
        big = last[0].numel() >= 1 << 20
        for _ in range(2):  # warm-up
            objective(z), gemm_rate()
        gemm, evaluation, bandwidth = [], [], []
        for _ in range(args.rounds):
            gemm.append(gemm_rate())
            start = time.perf_counter()
            objective(z)
            evaluation.append((time.perf_counter() - start) / len(observations))
            if big:
                bandwidth.append(gemv_rate(last[:4]))
        rate, seconds = statistics.median(gemm), statistics.median(evaluation)
        limit = 2 * macs / (rate * 1e9)
        bound = "-"
        if big:  # four passes over each victim's last-layer weights
            streamed = 4 * last[0].numel() * last[0].element_size()
            bound = f"{1e3 * streamed / (statistics.median(bandwidth) * 1e9):.2f}"
        print(f"| {dataset} | {2 * macs / 1e6:.2f} | {rate:.1f} | {1e3 * limit:.3f} | "
              f"{1e3 * seconds:.3f} | {2 * macs / seconds / 1e9:.1f} | "
              f"{seconds / limit:.1f}x | {bound} |")  # fmt: skip
        assert math.isfinite(seconds) and linear_macs <= macs


if __name__ == "__main__":
    main()
