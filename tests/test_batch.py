"""Batches: the label multiset from the last layer, optimal matching, batch attacks, CLI."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradleak import IDLG, build_model, observe
from gradleak.attacks.labels import batch_labels, estimated_softmax, last_linear_layer
from gradleak.cli import main
from gradleak.data import load_dataset
from gradleak.data.dataset import ImageDataset
from gradleak.experiments.common import derive_seeds
from gradleak.metrics import match_reconstructions
from gradleak.types import Observation


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def random_batch(
    dataset: ImageDataset, batch_size: int, *, repeated: bool, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch: distinct labels, or labels of which at least one repeats.

    With `repeated`, k in 1..B-1 classes are drawn, each appears once, and the
    other B-k examples take one of those k classes at random.  Each example is
    a random image of its class.
    """
    classes = torch.randperm(dataset.num_classes, generator=generator)
    if repeated:
        k = int(
            torch.randint(1, min(batch_size, dataset.num_classes + 1), (1,), generator=generator)
        )
        extra = torch.randint(k, (batch_size - k,), generator=generator)
        labels = torch.cat([classes[:k], classes[extra]])
    else:
        labels = classes[:batch_size]
    pools = torch.from_numpy(dataset.labels.copy())
    indices = []
    for label in labels.tolist():
        pool = (pools == label).nonzero().flatten()
        indices.append(int(pool[torch.randint(len(pool), (1,), generator=generator)]))
    images = torch.stack([dataset[i][0] for i in indices])
    return images, torch.tensor([dataset[i][1] for i in indices])


def label_multiset_accuracy(
    dataset: ImageDataset, batch_size: int, *, repeated: bool, batches: int, seed: int
) -> float:
    """Share of random batches whose label multiset `batch_labels` gets exactly right.

    iDLG's protocol per batch: a fresh uniform-init LeNet, seeded per batch.
    """
    generator = torch.Generator().manual_seed(seed)
    right = 0
    for b in range(batches):
        x, y = random_batch(dataset, batch_size, repeated=repeated, generator=generator)
        model = build_model(
            "lenet", input_shape=dataset.shape, num_classes=dataset.num_classes, seed=seed + b
        )
        right += batch_labels(observe(model, x, y)).tolist() == sorted(y.tolist())
    return right / batches


@pytest.mark.parametrize("name", ["mnist", "cifar100"])
def test_batch_labels_are_exact_on_batches_of_distinct_labels(data_root: Path, name: str) -> None:
    dataset = load_dataset(name, data_dir=data_root, download=False)
    for batch_size in (2, 3, 4, 6, 8):
        accuracy = label_multiset_accuracy(
            dataset, batch_size, repeated=False, batches=40, seed=100 * batch_size
        )
        assert accuracy == 1.0, f"{name} B={batch_size}: {accuracy:.1%}"


@pytest.mark.parametrize("name", ["mnist", "cifar100"])
def test_batch_label_counts_with_repeated_labels(data_root: Path, name: str) -> None:
    # Measured on 500 batches per dataset and B = 2..8: 100% (see
    # batch_label_counts_from_gradients).  An estimate, not a proof, so the
    # assertion allows one miss in 40.
    dataset = load_dataset(name, data_dir=data_root, download=False)
    for batch_size in (2, 4, 8):
        accuracy = label_multiset_accuracy(
            dataset, batch_size, repeated=True, batches=40, seed=7 + 100 * batch_size
        )
        assert accuracy >= 0.975, f"{name} B={batch_size}: {accuracy:.1%}"


def test_count_identity_and_sign_rule_against_the_true_softmax() -> None:
    # The obviously-correct reference: with the victim's own softmax S, the
    # counts are exactly S - B * g_b; and no class with a negative bias
    # gradient is ever absent.
    generator = torch.Generator().manual_seed(3)
    for trial in range(20):
        x = torch.rand(6, 1, 28, 28, generator=generator)
        y = torch.randint(4, (6,), generator=generator)  # repeats are certain
        model = build_model("lenet", input_shape=(1, 28, 28), num_classes=10, seed=trial)
        observation = observe(model, x, y)
        _, bias = last_linear_layer(model)
        gb = observation.gradient(bias).double()
        with torch.no_grad():
            mass = torch.softmax(model(x).double(), dim=-1).sum(dim=0)
        counts = torch.bincount(y, minlength=10).double()
        torch.testing.assert_close(mass - 6 * gb, counts, atol=1e-5, rtol=0)
        assert set((gb < 0).nonzero().flatten().tolist()) <= set(y.tolist())


def test_estimated_softmax_is_the_softmax_when_all_examples_look_alike() -> None:
    # Identical examples share one softmax, so the estimate is exact.
    model = build_model("lenet", input_shape=(1, 28, 28), num_classes=10, seed=4)
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0)).expand(5, -1, -1, -1)
    observation = observe(model, x.contiguous(), torch.tensor([1, 1, 1, 7, 7]))
    estimate = estimated_softmax(
        observation.gradient("fc.weight").double(),
        observation.gradient("fc.bias").double(),
        model.fc.weight.detach().double(),
        model.fc.bias.detach().double(),
    )
    with torch.no_grad():
        truth = torch.softmax(model(x[:1]).double(), dim=-1)[0]
    torch.testing.assert_close(estimate, truth, atol=1e-5, rtol=0)
    assert batch_labels(observation).tolist() == [1, 1, 1, 7, 7]


def test_matching_is_the_best_permutation() -> None:
    generator = torch.Generator().manual_seed(0)
    originals = torch.rand(5, 1, 6, 6, generator=generator)
    noisy = originals + 0.3 * torch.randn(5, 1, 6, 6, generator=generator)
    shuffled = noisy[[3, 0, 4, 1, 2]]
    order, per_pair = match_reconstructions(shuffled, originals)
    assert order == [1, 3, 4, 0, 2]

    def total(perm: tuple[int, ...]) -> float:
        return sum(float(((shuffled[j] - originals[i]) ** 2).mean()) for i, j in enumerate(perm))

    brute = min(itertools.permutations(range(5)), key=total)
    assert list(brute) == order
    assert per_pair == pytest.approx(
        [float(((shuffled[j] - originals[i]) ** 2).mean()) for i, j in enumerate(order)]
    )


def _victim_batch(
    dataset: str, indices: list[int], seed: int = 0
) -> tuple[Observation, torch.Tensor, list[int], int]:
    """The CLI's victim batch: a seeded LeNet and built-in images; returns the attack seed."""
    data = load_dataset(dataset)
    images = torch.stack([data[i][0] for i in indices])
    labels = [data[i][1] for i in indices]
    model_seed, attack_seed = derive_seeds(seed, 2)
    model = build_model(
        "lenet", input_shape=data.shape, num_classes=data.num_classes, seed=model_seed
    )
    return observe(model, images, torch.tensor(labels)), images, labels, attack_seed


def test_improved_idlg_rebuilds_a_batch_of_four_mnist_digits() -> None:
    # Labels fixed by the batch rule, images alone optimised (improved DLG for batches).
    observation, images, labels, seed = _victim_batch("sample", [0, 1, 2, 3])
    result = IDLG(improved=True)(observation, seed=seed)
    assert result.labels.tolist() == sorted(labels)
    order, per_image = match_reconstructions(result.inputs, images)
    assert max(per_image) < 1e-3
    assert sorted(order) == [0, 1, 2, 3]


def test_improved_idlg_rebuilds_a_batch_of_four_cifar100_images(data_root: Path) -> None:
    # On DLG's own LeNet (strides removed), the batch's gradient pins every
    # image down; on iDLG's strided LeNet it does not (see the README).
    data = load_dataset("cifar100", data_dir=data_root, download=False)
    chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:4].tolist()
    images = torch.stack([data[i][0] for i in chosen])
    labels = [data[i][1] for i in chosen]
    model = build_model("lenet-dlg", input_shape=data.shape, num_classes=100, seed=0)
    result = IDLG(improved=True)(observe(model, images, torch.tensor(labels)), seed=0)
    assert result.labels.tolist() == sorted(labels)
    order, per_image = match_reconstructions(result.inputs, images)
    assert max(per_image) < 1e-4, per_image  # measured: 7e-7 to 2e-6
    assert [labels[i] for i in range(4)] == [int(result.labels[j]) for j in order]


def gradleak(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GRADLEAK_NO_DOWNLOAD": "1", "GRADLEAK_DATA": str(tmp_path / "nodata")}
    return subprocess.run(
        [sys.executable, "-m", "gradleak.cli", *args],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip


def test_attack_cli_on_a_batch(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ("attack", "--indices", "3,0", "--improved", "--out", str(out))
    done = gradleak(*args, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "recovered labels" in done.stdout and "correct" in done.stdout
    row = json.loads((out / "metrics.json").read_text())
    assert row["batch_size"] == 2 and row["indices"] == [3, 0]
    assert row["true_labels"] == [7, 2]  # built-in samples 3 and 0
    assert row["labels_correct"] and sorted(row["predicted_labels"]) == [2, 7]
    assert len(row["per_image_mse"]) == 2 and max(row["per_image_mse"]) < 1e-3
    assert row["mse"] == pytest.approx(sum(row["per_image_mse"]) / 2)
    png = (out / "reconstruction.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000


def test_batch_bad_input_is_one_line_and_exit_code_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # In-process (the subprocess path is covered above): main() ends in SystemExit(2).
    monkeypatch.setenv("GRADLEAK_NO_DOWNLOAD", "1")
    cases = {
        "past the end": (["--index", "6", "--batch-size", "4"], "runs past the end"),
        "index out of range": (["--indices", "1,2,9"], "index 9 is out of range"),
        "duplicate": (["--indices", "1,2,2"], "repeats [2]"),
        "malformed": (["--indices", "1,x"], "--indices"),
        "negative": (["--indices", "1,-2"], "--indices"),
        "empty": (["--indices", ""], "--indices"),
        "disagreeing": (["--indices", "1,2", "--batch-size", "3"], "disagrees"),
        "zero batch": (["--batch-size", "0"], "--batch-size"),
    }
    failures = []
    for case, (args, expected) in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["attack", *args, "--out", str(tmp_path / "out")])
        lines = capsys.readouterr().err.strip().splitlines()
        ok = (
            exit_info.value.code == 2
            and len(lines) == 1
            and lines[0].startswith("gradleak: error: ")
            and expected in lines[0]
        )
        if not ok:
            failures.append(f"{case}: code={exit_info.value.code} stderr={lines!r}")
    assert not failures, "\n".join(failures)
