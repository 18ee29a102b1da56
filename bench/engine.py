"""Sequential vs batched engine, faithful vs improved mode, on the same victims.

Each victim: a fresh uniform-init LeNet and a random real test image (iDLG's
protocol).  The same victims go through every path in one run; the table
gives victims per minute, the share rebuilt below MSE 1e-3, and the speed
ratio against the paper's setting (faithful mode, sequential engine).

    .venv/bin/python bench/engine.py --dataset mnist --victims 64 --width 16
    .venv/bin/python bench/engine.py --dataset cifar100 --victims 16 --width 8

"improved" is gradleak's default improved mode (closed-form warm start, then
L-BFGS with a line search in float64); "improved, no warm start" is the same
optimiser from the usual mid-grey draw, to show what each part buys.

Needs the real data (GRADLEAK_DATA or ../shared/data).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from gradleak import IDLG, build_model, observe
from gradleak.attacks.engine import attack_batch
from gradleak.data import load_dataset
from gradleak.metrics import mse

DATA = Path(os.environ.get("GRADLEAK_DATA", Path(__file__).resolve().parents[2] / "shared/data"))


def victims(dataset: str, count: int, seed: int) -> tuple[list, list[torch.Tensor]]:
    data = load_dataset(dataset, data_dir=DATA, download=False)
    rng = torch.Generator().manual_seed(seed)
    indices = torch.randint(len(data), (count,), generator=rng).tolist()
    observations, images = [], []
    for i, index in enumerate(indices):
        image, label = data[index]
        model = build_model(
            "lenet", input_shape=data.shape, num_classes=data.num_classes, seed=seed * 7919 + i
        )
        observations.append(observe(model, image, torch.tensor(label)))
        images.append(image)
    return observations, images


def run(
    path: str, mode: str, observations: list, images: list, width: int, every: int = 1
) -> tuple[float, float, int]:
    """Seconds, share below MSE 1e-3 and evaluations of one path on the victims.

    With `every` > 1 the sequential engine attacks only every `every`-th
    victim and the seconds and evaluations are scaled up by `every`: one
    victim's sequential attack does not depend on the others, so this is an
    unbiased projection of the full run (and printed as one).
    """
    if mode == "improved, no warm start":
        attack = IDLG(improved=True, warm_start="none")
    else:
        attack = IDLG(improved=mode == "improved")
    seeds = list(range(len(observations)))
    start = time.perf_counter()
    if path == "sequential":
        picked = list(range(0, len(observations), every))
        results = [attack(observations[i], seed=seeds[i]) for i in picked]
        images = [images[i] for i in picked]
    else:
        results = attack_batch(attack, observations, seeds, width=width)
    seconds = time.perf_counter() - start
    rebuilt = sum(mse(r.inputs[0], x) < 1e-3 for r, x in zip(results, images, strict=True))
    scale = every if path == "sequential" else 1
    return seconds * scale, rebuilt / len(images), scale * sum(r.evaluations for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist", choices=["mnist", "cifar100", "lfw"])
    parser.add_argument("--victims", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=16, help="victims at a time (faithful)")
    parser.add_argument(
        "--skip-cold", action="store_true", help="leave out improved without the warm start"
    )
    parser.add_argument("--improved-only", action="store_true", help="profile improved mode")
    parser.add_argument("--faithful-only", action="store_true", help="profile faithful mode")
    parser.add_argument(
        "--sequential-every", type=int, default=1,
        help="time the sequential engine on every k-th victim and project (k = 1: all)",
    )  # fmt: skip
    # speed: relative to faithful mode on the sequential engine (the paper's setting).
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the attacks then keep this count
    torch.set_num_threads(args.threads)
    observations, images = victims(args.dataset, args.victims, args.seed)
    rows = []
    paths = [("faithful", "sequential"), ("faithful", "batched"), ("improved", "sequential"),
             ("improved", "batched"), ("improved, no warm start", "batched")]  # fmt: skip
    if args.skip_cold:
        paths = paths[:-1]
    if args.improved_only:
        paths = [("improved", "sequential"), ("improved", "batched")]
    if args.faithful_only:
        paths = paths[:2]
    for mode, path in paths:
        seconds, share, evaluations = run(
            path, mode, observations, images, args.width, args.sequential_every
        )
        rows.append((mode, path, seconds, share, evaluations))
    base = rows[0][2]
    print(f"iDLG, {args.dataset}, {args.victims} victims (width {args.width}), "
          f"{args.threads} thread(s), torch {torch.__version__}")  # fmt: skip
    if args.sequential_every > 1:
        print(f"sequential rows: every {args.sequential_every}th victim timed, seconds and "
              f"evaluations projected to all {args.victims}")  # fmt: skip
    header = "| mode | engine | seconds | victims/min | MSE<1e-3 | evaluations | speed |"
    print(header + "\n" + "|---" * 7 + "|")
    for mode, path, seconds, share, evaluations in rows:
        print(f"| {mode} | {path} | {seconds:.1f} | {60 * args.victims / seconds:.1f} | "
              f"{share:.0%} | {evaluations} | {base / seconds:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
