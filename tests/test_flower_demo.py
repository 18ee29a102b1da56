"""`gradleak flower-demo` end to end: a real Flower simulation on Ray, captured and audited.

One run (2 clients, 1 round) of the command a user types, in a subprocess so
that Ray and Flower's environment stay out of the test process.  It costs
about 20-30 s, most of it Ray starting and its workers importing torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason='the Flower tests need pip install "gradleak[flower]"')


def test_flower_demo_runs_flower_and_rebuilds_every_client(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    command = [
        str(Path(sys.executable).with_name("gradleak")),
        "flower-demo", "--clients", "2", "--rounds", "1", "--data-dir", str(data_root),
        "--out", str(out), "--workers", "1",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    entries = json.loads((out / "leakage.json").read_text())
    demo = json.loads((out / "captures" / "demo.json").read_text())
    assert demo["settings"]["clients"] == 2 and demo["simulation_seconds"] > 0
    # Two Flower nodes, their random 64-bit ids as the server saw them.
    assert len(entries) == 2 and len({e["node_id"] for e in entries}) == 2
    for entry in entries:
        assert entry["round"] == 1 and entry["num_examples"] == 1 and entry["method"] == "idlg"
        assert entry["true_labels"] == entry["predicted_labels"]
        assert entry["mse"] < 1e-3
        assert (out / entry["strip"]).is_file()
    assert (out / "overview.png").is_file()
    assert (out / "report.md").read_text().startswith("# What this Flower run leaked")
    # Flower's and Ray's state stayed under OUT (Ray's through a short link, then removed).
    assert (out / ".flwr").is_dir() and list((out / ".ray").glob("session_*"))
    print(f"flower-demo, 2 clients x 1 round: {seconds:.1f} s")
