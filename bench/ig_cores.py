"""One Inverting Gradients attack on one core or two: step throughput side by side.

The trained ConvNet of bench/ig_defaults.py (``--weights``, from ``gradleak
train --model convnet --dataset mnist --epochs 1``), one held-out MNIST image,
labels inferred, a fixed count of steps per trial (the step schedule, so that
every variant does the same work).  Variants, interleaved over ``--rounds``
so that a changing load on a shared machine falls on all of them alike:

* ``1 thread``: one trial, one intra-op thread (the default);
* ``2 threads``: one trial, two intra-op threads (each step split across cores);
* ``2 trials, sequential``: two restarts one after the other, one thread;
* ``2 trials, parallel``: two restarts at once (``IGConfig(parallel=2)``), one
  thread each.

Printed: median seconds per variant and trial-steps per second against the
first.  PSNR at equal time is bench/ig_defaults.py's ``--candidates
default,restarts-parallel``.

    .venv/bin/python bench/ig_cores.py --weights W --steps 30 --rounds 3 --mode train
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from ig_defaults import victims  # bench/ is on sys.path when run as a script

from gradleak import observe
from gradleak.attacks.inverting import IGConfig, InvertingGradients

# name -> (intra-op threads, config overrides, trials)
VARIANTS = {
    "1 thread": (1, {}, 1),
    "2 threads": (2, {}, 1),
    "2 trials, sequential": (1, {"restarts": 1}, 2),
    "2 trials, parallel": (1, {"restarts": 1, "parallel": 2}, 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", default="train", choices=("train", "eval"))
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # the attack then keeps the count set here
    model, pairs = victims(args.weights, 1)
    image, label = pairs[0]
    model.train(args.mode == "train")
    observation = observe(model, image[None], torch.tensor([label]), batchnorm=args.mode)
    base = IGConfig(iterations=args.steps, schedule="step", lr_decay=False)
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        for name, (threads, overrides, _) in VARIANTS.items():
            torch.set_num_threads(threads)
            attack = InvertingGradients(base, **overrides)
            started = time.perf_counter()
            attack(observation, seed=round_)
            seconds[name].append(time.perf_counter() - started)
            print(f"round {round_} {name}: {seconds[name][-1]:.1f} s", flush=True)
    first = None
    print(f"\n{args.steps} steps a trial, {args.mode} mode, median of {args.rounds} rounds\n")
    print("| variant | seconds | trial-steps per second | vs 1 thread |")
    print("|---|---|---|---|")
    for name, (_, _, trials) in VARIANTS.items():
        median = statistics.median(seconds[name])
        rate = trials * args.steps / median
        first = first or rate
        print(f"| {name} | {median:.1f} | {rate:.2f} | {rate / first:.2f}x |")


if __name__ == "__main__":
    main()
