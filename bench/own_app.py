"""A quickstart-style Flower app audited from the server's seat, at several client sizes.

The app is tests/apps/quickstart (its own Net with max-pooling, inputs normalised
with 0.5/0.5, SGD with momentum 0.9 over local epochs of shuffled mini-batches,
local-epochs and batch-size in its run config, only lr in the train config),
untouched but for the three lines that wrap its strategy in LeakageAudit.  Each
setting runs the app on Flower's simulation engine (4 clients, 1 round, MNIST
test images as RGB 32 x 32), stores each node's training examples beside the
capture (found by the partition id the app reports), and runs

    gradleak audit CAPTURES --model qsapp.task:Net --flwr-app APP --batch-size B --momentum 0.9

from the app's folder.  Per client it reports the label histogram's error, whether
the class set is exact, the images recognisable (PSNR >= 20 dB or SSIM >= 0.6) where
images are attacked (clients of at most --max-examples), and the audit's seconds.

    .venv/bin/python bench/own_app.py --examples 8,32,128,512 --batch-sizes 32,8

Each setting runs in a subprocess (Ray and Flower's state stay out of this one).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "tests" / "apps" / "quickstart"


def prepare(out: Path, examples: int, clients: int, data_dir: str, seed: int) -> Path:
    """data.npz: clients partitions of MNIST test images (RGB 32 x 32), each 80% training."""
    from gradleak.data import load_dataset

    dataset = load_dataset("mnist", data_dir=data_dir, shape=(3, 32, 32))
    per = math.ceil(examples / 0.8)
    order = np.random.default_rng(seed).permutation(len(dataset))[: per * clients]
    images = np.stack([dataset[int(i)][0].numpy() for i in order])
    path = out / "data.npz"
    np.savez(path, images=images, labels=dataset.labels[order])
    return path


def partition(path: Path, clients: int, pid: int) -> tuple[np.ndarray, np.ndarray]:
    """What the app's load_data trains on: the first 80% of partition pid."""
    with np.load(path) as data:
        images, labels = data["images"], data["labels"]
    per = len(labels) // clients
    split = int(0.8 * per)
    return images[pid * per : pid * per + split], labels[pid * per : pid * per + split]


def one(args: argparse.Namespace) -> None:
    """Simulate the app once and store the ground truth (runs in a subprocess)."""
    from gradleak.experiments.flower_demo.own_app import simulate_app, write_truth_from_metrics

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(out, args.n, args.clients, args.data_dir, args.seed)
    seconds = simulate_app(
        APP, clients=args.clients, state_dir=out / "state",
        override={"captures": str(out / "captures"), "data-path": str(data),
                  "batch-size": args.batch},
    )  # fmt: skip
    stored = write_truth_from_metrics(
        out / "captures", "partition-id", lambda pid: partition(data, args.clients, pid)
    )
    (out / "simulation.json").write_text(json.dumps({"seconds": seconds, "stored": stored}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", default="8,32,128,512")
    parser.add_argument("--batch-sizes", default="32,8")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max-examples", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default="runs/bench-own-app")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args)
        return
    rows = []
    gradleak = str(Path(sys.executable).with_name("gradleak"))
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        for n in (int(v) for v in args.examples.split(",")):
            out = Path(args.out).resolve() / f"n{n}-b{batch}"
            subprocess.run(
                [sys.executable, __file__, "--one", "--n", str(n), "--batch", str(batch),
                 "--clients", str(args.clients), "--data-dir", args.data_dir,
                 "--out", str(out), "--seed", str(args.seed)],
                check=True,
            )  # fmt: skip
            command = [
                gradleak, "audit", str(out / "captures"), "--model", "qsapp.task:Net",
                "--flwr-app", ".", "--batch-size", str(batch), "--momentum", "0.9",
                "--out", str(out / "audit"),
                "--max-examples", str(args.max_examples), "--workers", "1",
            ]  # fmt: skip
            if args.iterations:
                command += ["--iterations", str(args.iterations)]
            started = time.perf_counter()
            subprocess.run(command, cwd=APP, check=True, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            entries = json.loads((out / "audit" / "leakage.json").read_text())
            rows.append((n, batch, entries, seconds))
            print(summary_line(n, batch, entries, seconds), flush=True)
    print()
    print(table(rows))


def summary_line(n: int, batch: int, entries: list[dict], seconds: float) -> str:
    errors = [e["histogram_error"] for e in entries if e["histogram_error"] is not None]
    exact = sum(1 for e in entries if e["class_set_exact"])
    return (
        f"n={n} b={batch}: histogram error {np.mean(errors):.3f} (max {max(errors):.3f}), "
        f"exact class set {exact}/{len(entries)}, {seconds:.0f} s"
    )


def table(rows: list[tuple[int, int, list[dict], float]]) -> str:
    lines = [
        "| examples per client | batch | steps per client | histogram error, mean (max) | "
        "exact class set | images recognisable | mean PSNR (dB) | audit s per client |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, batch, entries, seconds in rows:
        errors = [e["histogram_error"] for e in entries]
        exact = sum(1 for e in entries if e["class_set_exact"])
        attacked = [e for e in entries if e["images_recognisable"] is not None]
        images = (
            f"{sum(e['images_recognisable'] for e in attacked)}/"
            f"{sum(e['num_examples'] for e in attacked)}"
            if attacked
            else "not attacked"
        )
        psnr = [e["psnr"] for e in attacked if e["psnr"] is not None]
        lines.append(
            f"| {n} | {batch} | {math.ceil(n / batch)} | {np.mean(errors):.1%} "
            f"({max(errors):.1%}) | {exact}/{len(entries)} | {images} | "
            f"{np.mean(psnr) if psnr else float('nan'):.1f} | {seconds / len(entries):.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
