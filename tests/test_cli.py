"""`gradleak attack` end to end in a subprocess, and its answers to bad input."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REQUIRED_KEYS = {
    "method", "dataset", "index", "true_label", "predicted_label", "label_correct",
    "mse", "psnr", "ssim", "iterations", "evaluations", "seconds",
}  # fmt: skip


def gradleak(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GRADLEAK_NO_DOWNLOAD": "1", "GRADLEAK_DATA": str(tmp_path / "nodata")}
    return subprocess.run(
        [sys.executable, "-m", "gradleak.cli", *args],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["idlg", "dlg"])
def test_attack_end_to_end(tmp_path: Path, method: str) -> None:
    out = tmp_path / "run"
    done = gradleak("attack", "--method", method, "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "recovered label" in done.stdout and "correct" in done.stdout
    row = json.loads((out / "metrics.json").read_text())
    assert row.keys() >= REQUIRED_KEYS
    assert row["method"] == method and row["dataset"] == "sample" and row["index"] == 0
    assert row["label_correct"] and row["predicted_label"] == row["true_label"] == 2
    assert row["mse"] < 1e-3 and row["ssim"] > 0.99
    assert row["shared"] == "gradient" and row["per_image_psnr"] == [row["psnr"]]
    assert row["per_image_ssim"][0] == pytest.approx(row["ssim"], abs=1e-6)
    png = (out / "reconstruction.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000


def test_same_seed_same_numbers(tmp_path: Path) -> None:
    rows = []
    for name in ("a", "b"):
        args = ("attack", "--dataset", "sample-cifar100", "--iterations", "3", "--seed", "7")
        done = gradleak(*args, "--out", str(tmp_path / name), tmp_path=tmp_path)
        assert done.returncode == 0, done.stderr
        rows.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    for key in ("mse", "psnr", "ssim", "predicted_label", "evaluations", "matching_loss"):
        assert rows[0][key] == rows[1][key]


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 40)
    )
    (corrupt / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    zero = tmp_path / "zero"
    zero.mkdir()
    (zero / "t10k-images-idx3-ubyte").write_bytes(b"")
    (zero / "t10k-labels-idx1-ubyte").write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    return {
        "unknown dataset": (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        "unknown model": (["--model", "vgg16"], "unknown model 'vgg16'"),
        "unknown method": (["--method", "gradinv"], "unknown method 'gradinv'"),
        "unknown device": (["--device", "tpu"], "unknown device 'tpu'"),
        "index out of range": (["--index", "8"], "index 8 is out of range"),
        "negative index": (["--index", "-1"], "--index"),
        "missing data dir": (
            ["--dataset", "mnist", "--data-dir", str(tmp_path / "absent")],
            "not found",
        ),
        "empty data dir": (["--dataset", "cifar100", "--data-dir", str(empty)], "not found"),
        "corrupt data files": (["--dataset", "mnist", "--data-dir", str(corrupt)], "corrupt"),
        "empty data files": (["--dataset", "mnist", "--data-dir", str(zero)], "t10k-"),
        "not an image": (["--dataset", str(text)], "notes.png"),
        "missing image": (["--dataset", str(tmp_path / "nope.jpg")], "nope.jpg"),
        "zero iterations": (["--iterations", "0"], "--iterations"),
        "negative iterations": (["--iterations", "-5"], "--iterations"),
        "negative seed": (["--seed", "-1"], "--seed: must be 0 or more"),
        "several local steps for iDLG": (
            ["--local-steps", "2", "--batch-size", "2"],
            "use --method ig",
        ),
        "missing weights": (["--weights", str(tmp_path / "w.safetensors")], "w.safetensors"),
        "zero local lr": (["--local-lr", "0"], "--local-lr"),
        "width for lenet": (["--width", "8"], "width"),
        "unknown option": (["--frobnicate"], "--frobnicate"),
        "unknown batchnorm mode": (["--batchnorm", "frozen"], "--batchnorm"),
        "negative tv scale": (["--method", "ig", "--tv-scale", "-1"], "--tv-scale"),
        "tv scale for idlg": (["--tv-scale", "0.1"], "use it with --method ig"),
        "improved with auto": (["--method", "auto", "--improved"], "auto picks"),
    }


def test_bad_input_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    failures = []
    for case, (args, expected) in _bad_inputs(tmp_path).items():
        done = gradleak("attack", *args, "--out", str(tmp_path / "out"), tmp_path=tmp_path)
        lines = done.stderr.strip().splitlines()
        ok = (
            done.returncode == 2
            and len(lines) == 1
            and lines[0].startswith("gradleak: error: ")
            and expected in lines[0]
            and "Traceback" not in done.stderr
        )
        if not ok:
            failures.append(f"{case}: rc={done.returncode} stderr={done.stderr!r}")
    assert not failures, "\n".join(failures)


def test_weights_of_another_model_are_one_line(tmp_path: Path) -> None:
    from gradleak.models import build_model
    from gradleak.models.weights import save_weights

    path = tmp_path / "convnet.safetensors"
    model = build_model("convnet", input_shape=(1, 28, 28), num_classes=10, seed=0, width=4)
    save_weights(model, path, {"dataset": "mnist"})
    done = gradleak("attack", "--model", "lenet", "--weights", str(path),
                    "--out", str(tmp_path / "out"), tmp_path=tmp_path)  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "holds a convnet" in lines[0] and "lenet" in lines[0]


def test_inverting_gradients_attacks_a_fedavg_update(tmp_path: Path) -> None:
    # Two built-in digits, two local steps of one image each: the client sends an
    # update, IG unrolls it; a smoke run (few steps), checked for what it writes.
    out = tmp_path / "ig"
    done = gradleak("attack", "--method", "ig", "--model", "convnet", "--width", "4",
                    "--batch-size", "2", "--local-steps", "2", "--local-batch", "1",
                    "--local-lr", "0.01", "--iterations", "20", "--tv-scale", "0.05",
                    "--cores", "2", "--out", str(out), tmp_path=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    row = json.loads((out / "metrics.json").read_text())
    assert row["method"] == "ig" and row["shared"] == "update" and not row["labels_given"]
    # Two trials at once (--cores 2): 20 steps each, the better kept.
    assert (row["local_steps"], row["local_batch"], row["iterations"]) == (2, 1, 40)
    assert row["restarts"] == 1 and row["config"]["parallel"] == 2
    assert len(row["per_image_psnr"]) == len(row["per_image_ssim"]) == 2
    assert row["config"]["iterations"] == 20 and row["config"]["tv_scale"] == 0.05
    assert (out / "reconstruction.png").read_bytes().startswith(b"\x89PNG")
    known = gradleak("attack", "--labels", "known", "--out", str(out), tmp_path=tmp_path)
    assert known.returncode == 2 and "--labels known is for --method ig" in known.stderr


def test_auto_picks_and_says_which(tmp_path: Path) -> None:
    out = tmp_path / "auto"
    done = gradleak("attack", "--method", "auto", "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--method auto: improved iDLG" in " ".join(done.stdout.split())
    row = json.loads((out / "metrics.json").read_text())
    assert (row["method"], row["chosen_by"], row["improved"]) == ("idlg", "auto", True)
    assert row["choice"].startswith("improved iDLG") and row["label_correct"]
    assert row["mse"] < 1e-6
    relu = gradleak("attack", "--method", "auto", "--model", "convnet", "--width", "4",
                    "--batchnorm", "eval", "--iterations", "3", "--out", str(out),
                    tmp_path=tmp_path)  # fmt: skip
    assert relu.returncode == 0, relu.stderr
    row = json.loads((out / "metrics.json").read_text())
    assert (row["method"], row["batchnorm"], row["iterations"]) == ("ig", "eval", 3)
    assert row["config"]["tv_scale"] == 0.2  # the attack's own prior unless --tv-scale
    assert "piecewise-linear" in row["choice"]
