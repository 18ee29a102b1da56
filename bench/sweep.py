"""Executors side by side: one process, worker processes, local Ray, a two-node Ray cluster.

Runs the same `gradleak reproduce idlg` sweep end to end (the CLI as a user
runs it) on each path, into fresh folders, and prints wall times, the speed
against `--workers 1`, and whether every path wrote the same set of keys and
the same rows (timing fields aside) as the one-process run.

The two-node cluster is simulated on this machine: `ray start --head` and
`ray start --address` each with one CPU and their own ports, then
`--ray 127.0.0.1:PORT`; both nodes are stopped at the end.

    python bench/sweep.py --data-dir ../shared/data --experiments 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PATHS = ("workers-1", "workers-2", "ray-local", "ray-cluster")
TIMING = {"seconds"}
HEAD_PORT = 6391


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--experiments", type=int, default=64)
    parser.add_argument("--mode", default="faithful")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--out", default=None, help="folder for the runs (a temp dir)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the paths in turn this many times (median)"
    )
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="gradleak-bench-sweep-"))
    gradleak = str(Path(sys.executable).with_name("gradleak"))
    ray = str(Path(sys.executable).with_name("ray"))
    base = [gradleak, "reproduce", "idlg", "--dataset", args.dataset, "--data-dir",
            args.data_dir, "--experiments", str(args.experiments), "--mode", args.mode]  # fmt: skip
    results: dict[str, dict] = {}
    runs = [(path, r) for r in range(args.rounds) for path in args.paths.split(",")]
    for path, round_ in runs:
        out = root / (path if args.rounds == 1 else f"{path}-{round_}")
        shutil.rmtree(out, ignore_errors=True)
        extra = {
            "workers-1": ["--workers", "1"],
            "workers-2": ["--workers", "2"],
            "ray-local": ["--ray", "local"],
            "ray-cluster": ["--ray", f"127.0.0.1:{HEAD_PORT}"],
        }[path]
        if path == "ray-cluster":
            start_cluster(ray, root / "ray-nodes")
        try:
            started = time.perf_counter()
            done = subprocess.run(
                [*base, "--out", str(out), *extra], capture_output=True, text=True
            )
            wall = time.perf_counter() - started
        finally:
            if path == "ray-cluster":
                subprocess.run([ray, "stop", "--force"], capture_output=True)
        if done.returncode != 0:
            raise SystemExit(f"{path} failed:\n{done.stderr}")
        walls = results.get(path, {}).get("walls", []) + [wall]
        results[path] = {"wall": statistics.median(walls), "walls": walls, "rows": rows(out)}
        print(f"{path}: {wall:.1f} s", flush=True)
    print_table(args, results)


def start_cluster(ray: str, temp: Path) -> None:
    """A head and one worker node on this machine, one CPU each."""
    subprocess.run([ray, "stop", "--force"], capture_output=True)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    temp.mkdir(parents=True, exist_ok=True)
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    head = [ray, "start", "--head", "--port", str(HEAD_PORT), "--temp-dir", str(temp),
            "--include-dashboard", "false", *common]  # fmt: skip
    node = [ray, "start", "--address", f"127.0.0.1:{HEAD_PORT}", *common]
    for command in (head, node):
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}{done.stdout}")


def rows(out: Path) -> dict:
    table = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        identity = (row["experiment"], row["method"])
        if identity in table:
            raise SystemExit(f"{out}: {identity} written twice")
        table[identity] = {k: v for k, v in row.items() if k not in TIMING}
    return table


def print_table(args: argparse.Namespace, results: dict[str, dict]) -> None:
    reference = results.get("workers-1")
    print(f"\n`reproduce idlg --dataset {args.dataset} --experiments {args.experiments} "
          f"--mode {args.mode}`, {os.cpu_count()} CPU cores\n")  # fmt: skip
    print("| path | wall time (median) | speed vs --workers 1 | same keys | same rows |")
    print("|---|---|---|---|---|")
    for path, result in results.items():
        speed = f"{reference['wall'] / result['wall']:.2f}x" if reference else "n/a"
        keys = rows_equal = "n/a"
        if reference:
            keys = "yes" if result["rows"].keys() == reference["rows"].keys() else "NO"
            same = sum(result["rows"].get(k) == v for k, v in reference["rows"].items())
            rows_equal = f"{same}/{len(reference['rows'])}"
        each = ", ".join(f"{w:.1f}" for w in result["walls"])
        print(f"| {path} | {result['wall']:.1f} s ({each}) | {speed} | {keys} | {rows_equal} |")


if __name__ == "__main__":
    main()
