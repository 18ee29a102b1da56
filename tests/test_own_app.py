"""A Flower app gradleak did not write, audited end to end from the server's seat.

tests/apps/quickstart is written the way Flower's quickstart-pytorch is (its own Net
with max-pooling, 0.5/0.5 normalisation, SGD with momentum 0.9, local-epochs and
batch-size in its run config, only lr in the train config); it imports gradleak only
for the three lines around its strategy.  One run on Flower's simulation engine (Ray,
2 clients, 1 round, 16 MNIST images each as RGB 32 x 32, 2 mini-batches of 8) in a
subprocess (the run config's batch-size overridden to 8, as `flwr run --run-config`
would), then `gradleak audit --model qsapp.task:Net --flwr-app APP --batch-size 8
--momentum 0.9` from the app's folder, as its user would type it; then the bad inputs on
the same capture.  About 30 s, most of it Ray starting.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from gradleak.cli import main

pytest.importorskip("flwr", reason='the Flower tests need pip install "gradleak[flower]"')

APP = Path(__file__).parent / "apps" / "quickstart"
BENCH = Path(__file__).parent.parent / "bench" / "own_app.py"


@pytest.fixture(scope="module")
def captured(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("own-app")
    command = [
        sys.executable, str(BENCH), "--one", "--n", "16", "--batch", "8", "--clients", "2",
        "--data-dir", str(data_root), "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@dataclass
class Done:
    returncode: int
    stderr: str


@pytest.fixture()
def in_app(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run `gradleak` in this process from the app's folder, as its user would from a shell."""
    monkeypatch.chdir(APP)
    before = set(sys.modules)

    def run(*arguments: str) -> Done:
        capsys.readouterr()
        try:
            code = main(list(arguments))
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        return Done(code, capsys.readouterr().err)

    yield run
    for name in set(sys.modules) - before:
        if name == "qsapp" or name.startswith("qsapp.") or name == "othernet":
            del sys.modules[name]


def audit(run, captured: Path, *options: str, out: str = "audit") -> Done:
    return run(
        "audit", str(captured / "captures"), "--out", str(captured / out), "--workers", "1",
        *options,
    )  # fmt: skip


def test_the_apps_capture_names_its_own_model_and_normalisation(captured: Path) -> None:
    header = json.loads((captured / "captures" / "capture.json").read_text())
    model = header["model"]
    assert model["name"] == "qsapp.task:Net" and model["input_shape"] == [3, 32, 32]
    assert model["fingerprint"].startswith("sha256:") and model["num_classes"] == 10
    assert model["normalize"] == {"mean": [0.5] * 3, "std": [0.5] * 3}


def test_the_audit_reads_every_clients_labels_from_a_momentum_update(
    captured: Path, in_app
) -> None:
    done = audit(
        in_app, captured, "--model", "qsapp.task:Net", "--flwr-app", ".", "--batch-size", "8",
        "--momentum", "0.9", "--max-examples", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    entries = json.loads((captured / "audit" / "leakage.json").read_text())
    assert len(entries) == 2
    for entry in entries:
        assert entry["num_examples"] == 16 and entry["epochs"] == 1 and entry["local_batch"] == 8
        assert entry["method"] == "labels" and entry["shared"] == "update"
        assert entry["label_counts_true"] is not None
        assert sum(entry["label_counts_read"].values()) == 16
        # Momentum weighs the two mini-batches unequally, and the order (and the server's
        # initial Net) is drawn afresh each run: over 120 simulated clients of these partitions
        # the error was at most 3 of 16 (0.1875) and the class set exact for 119.
        assert entry["histogram_error"] <= 0.25
        # The replay of the client in another shuffled order: alike, not equal (measured
        # 0.75-0.94 over runs; an update drowned in noise would be near 0).
        assert entry["update_cosine"] > 0.4
    assert sum(e["class_set_exact"] for e in entries) >= 1
    assert sum(e["histogram_error"] for e in entries) / 2 <= 0.1875
    report = (captured / "audit" / "report.md").read_text()
    assert "## Labels and verdict per client" in report and "qsapp.task:Net" in report


def test_images_are_attacked_through_the_unrolled_momentum_client(captured: Path, in_app) -> None:
    done = audit(
        in_app, captured, "--model", "qsapp.task:Net", "--flwr-app", ".", "--batch-size", "8",
        "--momentum", "0.9", "--iterations", "20", out="images",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    entries = json.loads((captured / "images" / "leakage.json").read_text())
    for entry in entries:
        assert entry["method"] == "ig" and entry["iterations"] == 20
        assert len(entry["per_image_psnr"]) == 16 and entry["verdict"]
        assert (captured / "images" / entry["strip"]).is_file()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ((), "give --model qsapp.task:Net to confirm it"),
        (("--model", "lenet", "--input-shape", "3,32,32", "--num-classes", "10",
          "--flwr-app", "."), "do not fit the model"),
        (("--model", "qsapp.task:Net", "--momentum", "0.9"), "'local-epochs'"),
        (("--model", "qsapp.nothere:Net"), "cannot import 'qsapp.nothere'"),
        (("--model", "qsapp.task:Net", "--flwr-app", "/nonexistent"), "no pyproject.toml"),
        (("--model", "qsapp.task:Net", "--normalize", "0.5,0"), "above 0"),
        (("--model", "qsapp.task:Net", "--optimizer", "adam", "--momentum", "0.9"), "betas"),
        (("--model", "qsapp.task:Net", "--optimizer", "rmsprop"), "invalid choice"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line(
    captured: Path, in_app, options: tuple[str, ...], message: str
) -> None:
    done = audit(in_app, captured, *options, out=f"bad-{abs(hash(options))}")
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert message in done.stderr and "Traceback" not in done.stderr


def test_another_architecture_under_the_apps_name_is_refused(
    captured: Path, tmp_path: Path, in_app, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module that defines its own Net: importable, an nn.Module, another architecture.
    (tmp_path / "othernet.py").write_text(
        "import torch.nn as nn\n\nclass Net(nn.Sequential):\n    def __init__(self):\n"
        "        super().__init__(nn.Conv2d(3, 6, 5), nn.Flatten(), nn.Linear(4704, 10))\n"
    )
    monkeypatch.chdir(tmp_path)
    done = audit(in_app, captured, "--model", "othernet:Net", "--flwr-app", str(APP), out="other")
    assert done.returncode == 2 and "fingerprint" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
