"""`gradleak reproduce ig`: files, resume, workers, the trained stage, peers, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from gradleak.cli import build_parser, main
from gradleak.cli.reproduce_ig import refuse_ig_options
from gradleak.experiments.reproduce_ig import run as ig_run
from gradleak.experiments.reproduce_ig.report import PEERS, differences, nearest_peer
from gradleak.experiments.reproduce_ig.run import held_out, read_rows
from gradleak.models import read_metadata

# A tiny convnet and five Adam steps keep each attack well under a second.
TINY = ("--datasets", "mnist", "--batch-sizes", "1,2", "--local-steps", "1,4",
        "--iterations", "5", "--width", "2")  # fmt: skip


def cli(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as done:
        return int(done.code)


def lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def keys(rows: list[dict[str, Any]]) -> list[tuple]:
    return sorted(ig_run.row_key(r) for r in rows)


def expected(n: int, weights: tuple[str, ...] = ("untrained",)) -> list[tuple]:
    return sorted(("mnist", w, b, k, e) for w in weights for b in (1, 2) for k in (1, 4)
                  for e in range(n))  # fmt: skip


def timeless(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    return {ig_run.row_key(r): {k: v for k, v in r.items() if k != "seconds"} for r in rows}


def ig(data_root: Path, out: Path, *extra: str) -> int:
    return cli("reproduce", "ig", *TINY, "--data-dir", str(data_root), "--out", str(out), *extra)


@pytest.fixture(scope="module")
def small_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ig") / "run"
    assert ig(data_root, out, "--weights", "untrained", "--experiments", "2", "--workers", "1") == 0
    return out


def test_run_writes_every_file_and_the_summary_agrees(small_run: Path) -> None:
    rows = lines(small_run)
    assert keys(rows) == expected(2)
    pool = set(held_out(10_000, 0).tolist())
    for row in rows:
        b = row["batch_size"]
        assert len(set(row["image_indices"])) == b and set(row["image_indices"]) <= pool
        for field in ("true_labels", "predicted_labels", "per_image_psnr", "per_image_ssim"):
            assert len(row[field]) == b
        assert row["iterations"] == 5 and row["error"] is None
        assert row["psnr"] == pytest.approx(sum(row["per_image_psnr"]) / b)
        assert row["labels_exact"] == (
            sorted(row["predicted_labels"]) == sorted(row["true_labels"])
        )
        assert row["shared"] == ("gradient" if row["local_steps"] == 1 else "update")
        assert row["local_batch"] == (b if row["local_steps"] == 1 else max(1, b // 2))
    # Paired cells: K = 1 and K = 4 attack the same images.
    by_key = {ig_run.row_key(r): r for r in rows}
    for b in (1, 2):
        for e in range(2):
            one, four = (
                by_key[("mnist", "untrained", b, 1, e)],
                by_key[("mnist", "untrained", b, 4, e)],
            )
            assert one["image_indices"] == four["image_indices"]
    summary = json.loads((small_run / "summary.json").read_text())
    table = summary["tables"]["mnist"]
    assert [(t["weights"], t["batch_size"], t["local_steps"]) for t in table] == [
        ("untrained", 1, 1), ("untrained", 1, 4), ("untrained", 2, 1), ("untrained", 2, 4)
    ]  # fmt: skip
    for entry in table:
        mine = [r for r in rows if (r["batch_size"], r["local_steps"])
                == (entry["batch_size"], entry["local_steps"])]  # fmt: skip
        psnrs = [v for r in mine for v in r["per_image_psnr"]]
        assert entry["experiments"] == 2 and entry["images"] == len(psnrs)
        assert entry["psnr"]["mean"] == pytest.approx(sum(psnrs) / len(psnrs))
        assert entry["labels_exact"] == sum(r["labels_exact"] for r in mine) / 2
    report = (small_run / "report.md").read_text()
    assert "**5 iterations** (the paper: 24,000; fewer" in report
    assert "| untrained | 2 | 4 | 2 |" in report and "breaching FedAvg (nearest)" in report
    assert "held-out 20%" in report and "labels inferred" in report
    assert (small_run / "strip-mnist.png").read_bytes().startswith(b"\x89PNG")
    assert len(list(small_run.glob("strip-mnist-untrained-*.npz"))) == 4


def test_rerun_adds_nothing_and_a_cut_last_line_is_redone_once(
    small_run: Path, data_root: Path, tmp_path: Path
) -> None:
    out = Path(shutil.copytree(small_run, tmp_path / "copy"))
    before = (out / "results.jsonl").read_bytes()
    assert ig(data_root, out, "--weights", "untrained", "--experiments", "2", "--workers", "1") == 0
    assert (out / "results.jsonl").read_bytes() == before
    # A kill mid-write leaves the last line cut off: dropped, and its attack run again.
    cut = before[: before.rstrip(b"\n").rfind(b"\n") + 1]
    (out / "results.jsonl").write_bytes(cut + before[len(cut) : len(cut) + 40])
    assert ig(data_root, out, "--weights", "untrained", "--experiments", "2", "--workers", "1") == 0
    rows = lines(out)
    assert keys(rows) == expected(2)  # every line once
    assert timeless(rows) == timeless(lines(small_run))  # the redone line is the same


def test_two_workers_give_the_rows_of_one(small_run: Path, data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "two"
    assert ig(data_root, out, "--weights", "untrained", "--experiments", "2", "--workers", "2") == 0
    assert timeless(lines(out)) == timeless(lines(small_run))


def test_the_trained_model_is_trained_once_and_reused(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = ig_run.run_train

    def counting(run: Any, **kwargs: Any) -> Any:
        calls.append(run.dataset)
        return real(run, **kwargs)

    monkeypatch.setattr(ig_run, "run_train", counting)
    out = tmp_path / "trained"
    args = ("--weights", "trained", "--train-limit", "100", "--train-epochs", "1",
            "--batch-sizes", "1", "--local-steps", "1", "--workers", "1")  # fmt: skip
    assert ig(data_root, out, *args, "--experiments", "1") == 0
    weights = out / "mnist-convnet.safetensors"
    assert calls == ["mnist"] and weights.exists()
    saved = weights.read_bytes()
    meta = read_metadata(weights)
    assert meta["train_images"] == 80 and meta["test_images"] == 20 and meta["width"] == 2
    assert ig(data_root, out, *args, "--experiments", "2") == 0  # resumes: no training
    assert calls == ["mnist"] and weights.read_bytes() == saved
    assert keys(lines(out)) == [("mnist", "trained", 1, 1, 0), ("mnist", "trained", 1, 1, 1)]
    summary = json.loads((out / "summary.json").read_text())
    info = summary["trained"]["mnist"]
    assert info["test_accuracy"] == meta["test_accuracy"] and not info["trained_by_this_run"]
    assert (
        f"test accuracy **{100 * meta['test_accuracy']:.2f}%**" in (out / "report.md").read_text()
    )
    # The trained victims are the untrained ones' images, attacked on other weights.
    untrained = tmp_path / "untrained"
    assert ig(data_root, untrained, "--weights", "untrained", *args[6:], "--experiments", "1") == 0
    (mine,), (theirs,) = lines(untrained), [r for r in lines(out) if r["experiment"] == 0]
    assert mine["image_indices"] == theirs["image_indices"] and mine["psnr"] != theirs["psnr"]


def test_peers_nearest_and_what_differs() -> None:
    assert nearest_peer("trained", 4, 4) == (PEERS[0], True)  # breaching FedAvg
    assert nearest_peer("untrained", 8, 4)[0].name == "breaching FedAvg"
    assert nearest_peer("trained", 1, 1) == (PEERS[1], True)  # IG, trained ResNet-18, ImageNet
    assert nearest_peer("untrained", 1, 1)[0].attack == "DLG"
    assert nearest_peer("untrained", 8, 1) == (PEERS[2], False)  # IG, batch of 100
    said = differences(PEERS[0], "trained", 4, 4, {"iterations": 2000, "tv_scale": 0.2}, "mnist")
    assert said == ["model ResNet-18", "CIFAR-10", "labels given", "24,000 iterations", "TV 0.001"]
    context = {"iterations": 24_000, "tv_scale": 1e-3, "batchnorm": "train"}
    said = differences(PEERS[0], "trained", 4, 4, context, "cifar100")
    assert said == ["model ResNet-18", "CIFAR-10", "labels given", "BatchNorm in eval mode"]
    context = {"iterations": 24_000, "tv_scale": 5e-4, "batchnorm": "eval"}
    said = differences(PEERS[2], "trained", 8, 1, context, "cifar100")
    assert said == ["model ResNet32-10", "untrained", "100 images"]


def test_idlg_and_dlg_batch_see_plain_defaults_and_refuse_ig_options() -> None:
    args = build_parser().parse_args(["reproduce", "dlg-batch"])
    refuse_ig_options(args)
    assert type(args.iterations) is int and args.iterations == 300
    assert type(args.batch_sizes) is str and args.batch_sizes == "1,2,4,8"
    assert type(args.model) is str and args.model == "lenet-dlg"
    args = build_parser().parse_args(["reproduce", "idlg", "--local-steps", "4"])
    with pytest.raises(Exception, match="--local-steps is for 'reproduce ig'"):
        refuse_ig_options(args)


BAD = {
    "unknown dataset": (["--datasets", "imagenet"], "unknown 'imagenet'"),
    "zero batch size": (["--batch-sizes", "0"], "--batch-sizes expects whole numbers 1 or more"),
    "zero local steps": (["--local-steps", "0"], "--local-steps expects whole numbers 1 or more"),
    "unknown weights": (["--weights", "pretrained"], "--weights: unknown 'pretrained'"),
    "a papers' model": (["--model", "lenet"], "unknown model 'lenet' for reproduce ig"),
    "dlg-batch option": (["--methods", "dlg"], "--methods is not an option of 'reproduce ig'"),
    "batch too large": (["--batch-sizes", "3000"], "larger than the held-out 20% of mnist"),
    "missing data": (["--data-dir", "{tmp}/none"], "mnist"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_code_2(
    case: str,
    data_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GRADLEAK_NO_DOWNLOAD", "1")
    args, message = BAD[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = tmp_path / "out"
    base = ["reproduce", "ig", "--datasets", "mnist", "--data-dir", str(data_root)]
    assert cli(*base, *args, "--out", str(out)) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("gradleak: error: ") and message in error[0]
    assert not out.exists()


def test_other_settings_on_the_same_out_are_refused(
    small_run: Path, data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = Path(shutil.copytree(small_run, tmp_path / "copy"))
    assert ig(data_root, out, "--weights", "untrained", "--iterations", "6") == 2
    assert "other settings (iterations 5 -> 6)" in capsys.readouterr().err
    assert read_rows(out / "results.jsonl") == lines(small_run)


def test_the_default_table_fits_its_time_budget() -> None:
    default = ig_run.IGRun()
    # The paper's axes stay: both datasets and weights, B = 1 against batches, K = 1 against 4.
    assert default.datasets == ("mnist", "cifar100") and default.weights == ("untrained", "trained")
    assert default.batch_sizes == (1, 4, 8) and default.local_steps == (1, 4)
    assert default.experiments >= 2
    assert (default.epochs("mnist"), default.epochs("cifar100")) == (1, 8)
    assert ig_run.IGRun(train_epochs=3).epochs("cifar100") == 3
    # Image passes per evaluation, by hand: B for a gradient, K * max(1, B // 2) for an update.
    passes = {(b, k): ig_run.image_passes(ig_run.Cell("mnist", "trained", b, k))
              for b in (1, 4, 8) for k in (1, 4)}  # fmt: skip
    assert passes == {(1, 1): 1, (1, 4): 4, (4, 1): 4, (4, 4): 8, (8, 1): 8, (8, 4): 16}
    sizes = {"mnist": 10_000, "cifar100": 916}
    seconds = ig_run.estimated_seconds(default, sizes)
    assert seconds <= ig_run.DEFAULT_BUDGET_S
    # A slow reference: every cell's every experiment, at the measured rate, over two cores.
    attacks = sum(
        default.experiments * default.iterations * ig_run.image_passes(cell)
        * ig_run.SECONDS_PER_IMAGE_PASS[cell.dataset]
        for cell in default.cells
    )  # fmt: skip
    training = (
        8_000 * 1 * ig_run.TRAIN_SECONDS_PER_IMAGE_EPOCH["mnist"]
        + 732 * 8 * (ig_run.TRAIN_SECONDS_PER_IMAGE_EPOCH["cifar100"])
    )
    assert seconds == pytest.approx(training + attacks / ig_run.DEFAULT_CORES)
    # The former defaults (width 32, 8 experiments, 300 steps, 4 epochs) were hours.
    old = ig_run.IGRun(width=32, experiments=8, iterations=300, train_epochs=4)
    assert ig_run.estimated_seconds(old, sizes) > 5 * 3600
