"""What one cell of `gradleak reproduce ig` costs: seconds per attack step, per setting.

For each dataset, width, batch size B and local steps K, two victims of the
cell (built as the sweep builds them, `make_victim`) are attacked as one
group through the batched engine for a few steps, once with a fresh model per
victim (untrained cells) and once with one model they share (trained cells:
the engine passes shared weights once).  The seconds per victim-step, times
the iterations and experiments, give a cell's cost; their sum over the table
is what the defaults must keep under the hour (README, "An Inverting
Gradients table").

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/ig_table_cost.py --widths 32,16
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from gradleak.attacks.inverting_engine import attack_victims
from gradleak.experiments.common import cached_dataset
from gradleak.experiments.reproduce_ig.run import Cell, IGRun, build_attack, make_victim

DATA = Path(os.environ.get("GRADLEAK_DATA", Path(__file__).resolve().parents[2] / "shared/data"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="mnist,cifar100")
    parser.add_argument("--widths", default="32,16")
    parser.add_argument("--cells", default="1x1,1x4,4x1,4x4,8x1,8x4", help="BxK,...")
    parser.add_argument("--steps", type=int, default=4, help="attack steps timed per group")
    parser.add_argument("--victims", type=int, default=2, help="victims per group (the chunk)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    print("| dataset | width | B | K | weights | s per victim-step |")
    print("|---|---|---|---|---|---|")
    for dataset in args.datasets.split(","):
        data = cached_dataset(dataset, str(DATA))
        for width in (int(w) for w in args.widths.split(",")):
            run = IGRun(datasets=(dataset,), width=width, iterations=args.steps, data_dir=str(DATA))
            attack = build_attack(run)
            for text in args.cells.split(","):
                size, steps = (int(v) for v in text.split("x"))
                for weights in ("untrained", "trained"):
                    cell = Cell(dataset, weights, size, steps)
                    state = None
                    if weights == "trained":  # any one model all victims share
                        first = make_victim(data, run, cell._replace(weights="untrained"), 0,
                                            device)  # fmt: skip
                        del first
                        from gradleak.models import build_model

                        state = build_model(
                            "convnet", input_shape=data.shape, num_classes=data.num_classes,
                            seed=0, width=width,
                        ).state_dict()  # fmt: skip
                    victims = [
                        make_victim(data, run, cell, e, device, state) for e in range(args.victims)
                    ]
                    start = time.perf_counter()
                    attack_victims(
                        attack,
                        [v.observation for v in victims],
                        seeds=[v.attack_seed for v in victims],
                    )
                    seconds = (time.perf_counter() - start) / (args.steps * args.victims)
                    print(
                        f"| {dataset} | {width} | {size} | {steps} | {weights} | {seconds:.3f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
