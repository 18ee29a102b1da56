"""`gradleak reproduce dlg-batch`: files, resume, matching, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from gradleak.cli import main
from gradleak.data import load_dataset
from gradleak.experiments.dlg_batch.report import summarise, write_report
from gradleak.experiments.dlg_batch.run import (
    BatchRun,
    make_victim,
    read_rows,
    result_row,
    run_reproduce_batch,
)
from gradleak.types import Reconstruction

# iDLG's strided LeNet keeps these runs short (DLG's stride-free default is
# tested for recovery in test_batch.py).
BASE = ("--dataset", "sample-cifar100", "--model", "lenet", "--iterations", "3",
        "--batch-sizes", "1,2")  # fmt: skip


def cli(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as done:
        return int(done.code)


def lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def keys(rows: list[dict[str, Any]]) -> list[tuple[int, int, str]]:
    return sorted((r["batch_size"], r["experiment"], r["method"]) for r in rows)


def expected(n: int, sizes: tuple[int, ...] = (1, 2)) -> list[tuple[int, int, str]]:
    return sorted((b, e, m) for b in sizes for e in range(n) for m in ("dlg", "improved"))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("batch") / "run"
    assert cli("reproduce", "dlg-batch", *BASE, "--experiments", "2", "--out", str(out)) == 0
    return out


def test_run_writes_every_file_and_the_summary_agrees(small_run: Path) -> None:
    rows = lines(small_run)
    assert keys(rows) == expected(2)
    for row in rows:
        b = row["batch_size"]
        assert len(row["image_indices"]) == len(set(row["image_indices"])) == b
        assert len(row["per_image_mse"]) == len(row["predicted_labels"]) == b
        assert row["iterations"] <= 3
        assert row["recovered"] == (
            row["labels_exact"] and all(m is not None and m < 1e-3 for m in row["per_image_mse"])
        )
    summary = json.loads((small_run / "summary.json").read_text())
    for b in (1, 2):
        entry = summary["batch"][str(b)]
        assert entry["paper_iterations"] == {1: 270, 2: 600}[b]
        for method in ("dlg", "improved"):
            mine = [r for r in rows if r["batch_size"] == b and r["method"] == method]
            stats = entry["methods"][method]
            assert stats["experiments"] == 2
            assert stats["recovered"] == sum(r["recovered"] for r in mine)
    report = (small_run / "report.md").read_text()
    assert "--experiments 2" in report and "| 2 | 600 |" in report and "wall time" in report
    assert summary["model"] == "lenet" and "strides 2, 2, 1" in report
    for png in ("iterations.png", "strip.png"):
        assert (small_run / png).read_bytes().startswith(b"\x89PNG")


def test_the_report_names_a_partial_dataset(tmp_path: Path) -> None:
    rows = [
        {"batch_size": 2, "experiment": 0, "method": "dlg", "recovered": True,
         "labels_exact": True, "iterations": 40, "evaluations": 50, "seconds": 1.0}
    ]  # fmt: skip
    context = {
        "dataset": "cifar100", "model": "lenet", "iterations_cap": 50, "device": "cpu",
        "seed": 0, "chunk": 1, "command": "gradleak reproduce dlg-batch", "wall_seconds": 1.0,
        "torch": "0", "gradleak": "0",
    }  # fmt: skip
    summary = summarise(rows, (2,), 1, ("dlg",), **context)
    (tmp_path / "run.json").write_text(json.dumps({"dataset": "cifar100", "dataset_size": 916}))
    write_report(tmp_path, summary)
    report = (tmp_path / "report.md").read_text()
    assert "victims drawn from 916 of CIFAR-100's 10,000 test images (a partial copy)" in report


def test_improved_variant_recovers_single_images(small_run: Path) -> None:
    # One image: the label is read off exactly and the analytic start is exact.
    single = [r for r in lines(small_run) if r["batch_size"] == 1 and r["method"] == "improved"]
    assert single and all(r["recovered"] and r["labels_exact"] for r in single)


def test_resume_adds_each_line_exactly_once(small_run: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(small_run, tmp_path / "copy"))
    before = (out / "results.jsonl").read_bytes()
    assert cli("reproduce", "dlg-batch", *BASE, "--experiments", "2", "--out", str(out)) == 0
    assert (out / "results.jsonl").read_bytes() == before  # nothing left to do
    # A kill mid-write leaves a cut-off last line: it is dropped and its attack rerun.
    (out / "results.jsonl").write_bytes(before + b'{"batch_size": 1, "exper')
    args = ("reproduce", "dlg-batch", *BASE, "--experiments", "3", "--out", str(out))
    assert cli(*args) == 0
    rows = lines(out)
    assert keys(rows) == expected(3)
    old = {(r["batch_size"], r["experiment"], r["method"]): r for r in lines(small_run)}
    for row in rows:  # the first run's lines are kept as they were
        key = (row["batch_size"], row["experiment"], row["method"])
        if key in old:
            assert row == old[key]


def test_other_settings_on_the_same_out_are_refused(
    small_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = Path(shutil.copytree(small_run, tmp_path / "copy"))
    args = ("--dataset", "sample-cifar100", "--iterations", "4", "--experiments", "2")
    assert cli("reproduce", "dlg-batch", *args, "--out", str(out)) == 2
    assert "other settings" in capsys.readouterr().err


def test_matching_reorders_reconstructions_and_labels() -> None:
    data = load_dataset("sample-cifar100")
    run = BatchRun(dataset="sample-cifar100")
    victim = make_victim(data, run, 3, 0, torch.device("cpu"))
    again = make_victim(data, run, 3, 0, torch.device("cpu"))
    assert victim.indices == again.indices and len(set(victim.indices)) == 3
    order = [2, 0, 1]
    noisy = victim.images[order] + 1e-3 * torch.randn_like(victim.images)
    result = Reconstruction(inputs=noisy, labels=torch.tensor(victim.labels)[order], steps=7)
    row = result_row(victim, "dlg", result, 1.0)
    assert row["predicted_labels"] == list(victim.labels) and row["labels_exact"]
    assert all(m < 1e-3 for m in row["per_image_mse"]) and row["recovered"]
    wrong = Reconstruction(inputs=noisy, labels=torch.tensor(victim.labels), steps=7)
    if len(set(victim.labels)) == 3:
        assert not result_row(victim, "dlg", wrong, 1.0)["recovered"]


def test_read_rows_refuses_an_edited_file(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text('{"batch_size": 1, "experiment": 0, "method": "dlg"}\nnot json\n')
    with pytest.raises(Exception, match="not a result line"):
        read_rows(path)


BAD = {
    "zero batch size": (["--batch-sizes", "0"], "--batch-sizes"),
    "text batch size": (["--batch-sizes", "abc"], "--batch-sizes"),
    "unknown dataset": (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    "missing data dir": (["--dataset", "cifar100", "--data-dir", "{tmp}/none"], "cifar100"),
    "unknown method": (["--methods", "dlg,foo"], "unknown method 'foo'"),
    "unknown model": (["--model", "vgg"], "unknown model 'vgg'"),
    "idlg-only option": (["--all-datasets"], "--all-datasets"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_code_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADLEAK_NO_DOWNLOAD", "1")
    args, message = BAD[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = tmp_path / "out"
    assert cli("reproduce", "dlg-batch", *args, "--experiments", "1", "--out", str(out)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("gradleak: error: ") and message in error[0]
    assert not out.exists()


def test_real_cifar100_batch_of_two(data_root: Path, tmp_path: Path) -> None:
    run = BatchRun(
        batch_sizes=(2,),
        experiments=1,
        dataset="cifar100",
        data_dir=str(data_root),
        methods=("improved",),
        iterations=2,
        out=str(tmp_path / "real"),
    )
    summary = run_reproduce_batch(run)
    (row,) = read_rows(tmp_path / "real" / "results.jsonl")
    assert row["labels_exact"]  # the label multiset is read off the gradient exactly
    assert summary["batch"]["2"]["methods"]["improved"]["experiments"] == 1


def test_a_resnet_goes_through_the_sequential_engine(tmp_path: Path) -> None:
    # BatchNorm buffers cannot be vmapped: dlg-batch attacks ResNet victims one by one.
    run = BatchRun(
        batch_sizes=(1,),
        experiments=1,
        dataset="sample-cifar100",
        model="resnet20",
        methods=("improved",),
        iterations=1,
        out=str(tmp_path / "resnet"),
    )
    summary = run_reproduce_batch(run)
    (row,) = read_rows(tmp_path / "resnet" / "results.jsonl")
    assert row["labels_exact"] and row["iterations"] <= 1 and row["evaluations"] >= 1
    assert summary["model"] == "resnet20"
    assert "resnet20" in (tmp_path / "resnet" / "report.md").read_text()
