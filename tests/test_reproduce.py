"""`gradleak reproduce idlg`: the paper's protocol on real data, resumable, and its answers.

The attacks run at the paper's full budget (300 L-BFGS steps): the label-accuracy
claims hold for the protocol as published, not for a shortened one.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gradleak.cli import main
from gradleak.errors import DataError
from gradleak.experiments.reproduce_idlg import paper
from gradleak.experiments.reproduce_idlg.protocol import experiment_seeds
from gradleak.experiments.reproduce_idlg.report import (
    summarise,
    write_combined_report,
    write_dataset_report,
)
from gradleak.experiments.reproduce_idlg.run import ReproduceRun, run_reproduce
from gradleak.metrics import FIDELITY_THRESHOLDS
from gradleak.sweep.store import read_results

TIMING = {"seconds", "engine", "device"}  # what may differ between equal runs


def lines(out: Path) -> list[dict[str, Any]]:
    text = (out / "results.jsonl").read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def pairs(rows: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return sorted((r["experiment"], r["method"]) for r in rows)


def expected_pairs(n: int) -> list[tuple[int, str]]:
    return sorted((e, m) for e in range(n) for m in ("dlg", "idlg"))


def without_timing(rows: list[dict[str, Any]]) -> dict[tuple[int, str], dict[str, Any]]:
    return {(r["experiment"], r["method"]): {k: r[k] for k in r.keys() - TIMING} for r in rows}


def assert_summary_agrees(out: Path, n: int) -> dict[str, Any]:
    """summary.json recomputed from results.jsonl, independently of the summariser."""
    summary = json.loads((out / "summary.json").read_text())
    rows = [r for r in lines(out) if r["experiment"] < n]
    assert summary["experiments"] == n
    assert summary["attack_seconds"] == round(sum(r["seconds"] for r in rows), 3)
    for method in ("dlg", "idlg"):
        mine = [r for r in rows if r["method"] == method]
        got = summary["methods"][method]
        mses = [r["mse"] for r in mine]
        assert got["experiments"] == len(mine)
        assert got["label_correct"] == sum(r["label_correct"] for r in mine)
        assert got["label_accuracy"] == got["label_correct"] / len(mine)
        assert got["diverged"] == mses.count(None)
        assert got["converged"] == sum(r["converged"] for r in mine)
        assert got["restarts"] == sum(r["restarts"] for r in mine)
        for t in FIDELITY_THRESHOLDS:
            below = sum(1 for v in mses if v is not None and v < t)
            assert got["fidelity"][f"{t:g}"] == below / len(mine)
        for key in ("evaluations", "seconds", "iterations"):
            values = [r[key] for r in mine]
            assert got[key]["mean"] == math.fsum(values) / len(values)
            assert got[key]["median"] == statistics.median(values)
    return summary


def cli(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as done:
        return int(done.code)


@pytest.fixture(scope="module")
def mnist_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two MNIST experiments with the sequential engine, kept as a reference run."""
    out = tmp_path_factory.mktemp("reproduce") / "mnist"
    updates: list[tuple[str, float, int]] = []
    run = ReproduceRun(
        datasets=("mnist",),
        data_dir=str(data_root),
        experiments=2,
        engine="sequential",
        chunk=2,
        out=str(out),
        command="gradleak reproduce idlg --dataset mnist --experiments 2",
    )
    summaries = run_reproduce(run, callback=lambda *update: updates.append(update))
    return {"out": out, "summary": summaries[0], "updates": updates, "rows": lines(out)}


def copy_of(run: dict[str, Any], tmp_path: Path) -> Path:
    return Path(shutil.copytree(run["out"], tmp_path / "copy"))


def test_reference_run_writes_every_file(mnist_run: dict[str, Any]) -> None:
    out = mnist_run["out"]
    assert pairs(mnist_run["rows"]) == expected_pairs(2)
    assert mnist_run["summary"] == assert_summary_agrees(out, 2)
    for png in ("fidelity.png", "strip.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG")
    report = (out / "report.md").read_text()
    assert "--experiments 2" in report and "89.9%" in report and "read off Fig. 1" in report
    assert json.loads((out / "run.json").read_text())["seed"] == 0
    done = [d for _, d, _ in mnist_run["updates"]]
    assert done == sorted(done) and done[-1] == 2 and mnist_run["updates"][-1][2] == 2


def test_mnist_resume_extends_each_pair_exactly_once(
    mnist_run: dict[str, Any], data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = copy_of(mnist_run, tmp_path)
    before = (out / "results.jsonl").read_bytes()
    args = ("reproduce", "idlg", "--dataset", "mnist", "--data-dir", str(data_root))
    assert cli(*args, "--experiments", "4", "--engine", "sequential", "--out", str(out)) == 0
    assert "label accuracy" in capsys.readouterr().out
    assert (out / "results.jsonl").read_bytes().startswith(before)  # appended, never rewritten
    assert pairs(lines(out)) == expected_pairs(4)
    summary = assert_summary_agrees(out, 4)
    assert summary["methods"]["idlg"]["label_accuracy"] == 1.0  # iDLG's Table 1: 100%
    # A smaller N reports the first N and attacks nothing.
    assert cli(*args, "--experiments", "2", "--out", str(out)) == 0
    assert pairs(lines(out)) == expected_pairs(4)
    assert assert_summary_agrees(out, 2)["methods"]["dlg"]["experiments"] == 2


def test_truncated_last_line_is_dropped_and_rerun(
    mnist_run: dict[str, Any], data_root: Path, tmp_path: Path
) -> None:
    out = copy_of(mnist_run, tmp_path)
    text = (out / "results.jsonl").read_text()
    last = text.splitlines()[-1]
    (out / "results.jsonl").write_text(text[: len(text) - len(last) // 2 - 1])  # killed mid-line
    args = ("--dataset", "mnist", "--data-dir", str(data_root), "--out", str(out))
    assert cli("reproduce", "idlg", *args, "--experiments", "2", "--engine", "sequential") == 0
    rows = lines(out)
    assert pairs(rows) == expected_pairs(2)
    assert without_timing(rows) == without_timing(mnist_run["rows"])  # the same attack again
    assert_summary_agrees(out, 2)


def test_read_results_repairs_and_refuses(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text('{"experiment": 0, "method": "dlg"}\n{"experiment": 0, "method": "dlg"}\n{"exp')
    assert read_results(path) == [{"experiment": 0, "method": "dlg"}]  # duplicate kept once
    assert path.read_text().endswith("}\n")  # the cut line is gone from the file too
    path.write_text(
        '{"experiment": 0, "method": "dlg"}\nnot json\n{"experiment": 1, "method": "dlg"}\n'
    )
    with pytest.raises(DataError, match="line 2"):
        read_results(path)


def test_killed_run_resumes_without_duplicates(
    mnist_run: dict[str, Any], data_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    command = [
        sys.executable, "-m", "gradleak.cli", "reproduce", "idlg", "--dataset", "mnist",
        "--data-dir", str(data_root), "--experiments", "2", "--chunk", "1",
        "--engine", "sequential", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "GRADLEAK_NO_DOWNLOAD": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 300
    # The first chunk is experiment 0 by both methods: two complete lines.
    while not (results.exists() and results.read_bytes().count(b"\n") >= 2):
        assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
        assert time.monotonic() < deadline, "the first chunk never reached results.jsonl"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(read_results(results)) < 4  # it really was cut short
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = lines(out)
    assert pairs(rows) == expected_pairs(2)
    # Seeds come from (seed, dataset, experiment) alone: the same numbers as one clean run.
    assert without_timing(rows) == without_timing(mnist_run["rows"])
    assert_summary_agrees(out, 2)


@pytest.mark.parametrize(
    ("option", "value"), [("--seed", "1"), ("--mode", "improved"), ("--dataset", "cifar100")]
)
def test_other_settings_on_the_same_out_are_refused(
    mnist_run: dict[str, Any],
    data_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    option: str,
    value: str,
) -> None:
    out = copy_of(mnist_run, tmp_path)
    before = (out / "results.jsonl").read_bytes()
    settings = {"--dataset": "mnist", "--seed": "0", "--mode": "faithful", option: value}
    args = [a for pair in settings.items() for a in pair]
    assert cli("reproduce", "idlg", *args, "--data-dir", str(data_root), "--out", str(out)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("gradleak: error: ")
    assert "another --out" in error[0] and option.strip("-") in error[0]
    assert (out / "results.jsonl").read_bytes() == before


BAD_INPUTS = {
    "unknown dataset": (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    "unknown option": (["--dataset", "mnist", "--paper-is", "x"], "--paper-is"),
    "unknown mode": (["--dataset", "mnist", "--mode", "fast"], "unknown mode 'fast'"),
    "unknown engine": (["--dataset", "mnist", "--engine", "gpu"], "unknown engine 'gpu'"),
    "unknown device": (["--dataset", "mnist", "--device", "tpu"], "unknown device 'tpu'"),
    "zero experiments": (["--dataset", "mnist", "--experiments", "0"], "--experiments"),
    "zero chunk": (["--dataset", "mnist", "--chunk", "0"], "--chunk"),
    "negative seed": (["--dataset", "mnist", "--seed", "-1"], "--seed"),
    "no dataset": ([], "--dataset"),
    "both dataset flags": (["--dataset", "mnist", "--all-datasets"], "--all-datasets"),
    "missing data": (["--dataset", "mnist", "--data-dir", "{tmp}/absent"], "not found"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_code_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADLEAK_NO_DOWNLOAD", "1")
    args, expected = BAD_INPUTS[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = tmp_path / "out"
    assert cli("reproduce", "idlg", *args, "--out", str(out)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("gradleak: error: ") and expected in error[0]
    assert not out.exists()  # refused before anything was written


def test_unknown_paper_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli("reproduce", "dlg2", "--dataset", "mnist", "--out", str(tmp_path / "o")) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "unknown paper 'dlg2'" in error[0] and "dlg-batch" in error[0]


@pytest.mark.skipif(
    importlib.util.find_spec("gradleak.attacks.engine") is None,
    reason="the batched engine (gradleak.attacks.engine) is not written yet",
)
def test_batched_engine_agrees_with_the_sequential_one(
    mnist_run: dict[str, Any], data_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "batched"
    args = ("--dataset", "mnist", "--data-dir", str(data_root), "--out", str(out))
    assert cli("reproduce", "idlg", *args, "--experiments", "2", "--chunk", "2") == 0
    rows, reference = lines(out), without_timing(mnist_run["rows"])
    assert pairs(rows) == expected_pairs(2)
    for row in rows:
        ref = reference[(row["experiment"], row["method"])]
        assert row["engine"] == "batched"
        for key in ("image_index", "true_label", "predicted_label", "label_correct"):
            assert row[key] == ref[key]
        assert (row["mse"] < 1e-3) == (ref["mse"] < 1e-3)
    # Each result is charged the wall time since the previous one of its batch,
    # so that they add up to the batch's time (summary.json sums them).
    assert all(r["seconds"] > 0 for r in rows)
    assert assert_summary_agrees(out, 2)["engine"] == "batched"
    assert (out / "strip.png").exists()


def test_seeds_depend_on_seed_dataset_and_experiment_only() -> None:
    assert experiment_seeds(0, "mnist", 3) == experiment_seeds(0, "mnist", 3)
    drawn = [experiment_seeds(s, d, e) for s in (0, 1) for d in ("mnist", "lfw") for e in (0, 1)]
    every = [x for s in drawn for x in (s.model, s.index, *s.attacks.values())]
    assert len(set(every)) == len(every)


def test_paper_numbers() -> None:
    assert paper.LABEL_ACCURACY["cifar100"] == {"dlg": 0.833, "idlg": 1.0}
    lfw = list(paper.paper_fidelity("lfw", "idlg").values())
    assert lfw[0] == 0.91 and lfw[-1] == 0.83 and lfw == sorted(lfw, reverse=True)
    assert set(paper.paper_fidelity("mnist", "dlg").values()) == {0.76}


def test_reports_from_results_alone(tmp_path: Path) -> None:
    rows = [
        {"experiment": e, "method": m, "mse": mse, "label_correct": ok, "converged": ok,
         "restarts": 0, "iterations": 300, "evaluations": 3000, "seconds": 1.5}
        for e, (mse, ok) in enumerate([(1e-5, True), (None, False), (2e-3, True)])
        for m in ("dlg", "idlg")
    ]  # fmt: skip
    summaries = []
    sizes = {"mnist": 10000, "cifar100": 916, "lfw": 1499}  # as run.json pins them
    for dataset in ("mnist", "cifar100", "lfw"):
        context = {
            "dataset": dataset, "mode": "faithful", "engine": "sequential", "device": "cpu",
            "seed": 0, "command": "gradleak reproduce idlg --all-datasets", "wall_seconds": 2.0,
            "gradleak": "0", "torch": "0",
        }  # fmt: skip
        summary = summarise(rows, experiments=3, **context)
        assert summary["methods"]["idlg"]["fidelity"]["0.01"] == 2 / 3
        assert summary["methods"]["dlg"]["diverged"] == 1 and summary["complete"] == 3
        (tmp_path / dataset).mkdir()
        pinned = {"dataset": dataset, "dataset_size": sizes[dataset]}
        (tmp_path / dataset / "run.json").write_text(json.dumps(pinned))
        write_dataset_report(tmp_path / dataset, summary)
        assert (tmp_path / dataset / "fidelity.png").exists()
        summaries.append(summary)
    reports = {d: (tmp_path / d / "report.md").read_text() for d in sizes}
    assert "all 10,000 of MNIST's test images (the full test split)" in reports["mnist"]
    assert "MNIST's test split, where the original iDLG code read the train" in reports["mnist"]
    assert "916 of CIFAR-100's 10,000 test images (a partial copy)" in reports["cifar100"]
    assert "1,499 of LFW's 13,233 images (a partial copy)" in reports["lfw"]
    write_combined_report(tmp_path, summaries)
    combined = (tmp_path / "report.md").read_text()
    assert "916 of CIFAR-100's 10,000 test images (a partial copy)" in combined
    assert "| CIFAR-100 | 3 | 66.7% / 83.3% | 66.7% / 100.0% |" in combined
    assert "lfw/fidelity.png" in combined


@pytest.mark.slow
@pytest.mark.parametrize(("dataset", "n"), [("cifar100", 2), ("lfw", 1)])
def test_idlg_label_accuracy_is_100_percent(
    dataset: str, n: int, data_root: Path, tmp_path: Path
) -> None:
    # Few experiments: a faithful attack here costs 30-60 s (CIFAR-100) and several
    # minutes (LFW: its 5,749-class Linear layer dominates every evaluation).
    out = tmp_path / dataset
    args = ("--dataset", dataset, "--data-dir", str(data_root), "--out", str(out))
    assert cli("reproduce", "idlg", *args, "--experiments", str(n), "--engine", "sequential") == 0
    assert pairs(lines(out)) == expected_pairs(n)
    summary = assert_summary_agrees(out, n)
    assert summary["methods"]["idlg"]["label_accuracy"] == 1.0
    assert (out / "report.md").exists() and (out / "fidelity.png").exists()
