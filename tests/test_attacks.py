"""DLG and iDLG rebuild real images from their gradient (seeded, real outcomes)."""

from __future__ import annotations

import pytest
import torch

from gradleak import DLG, IDLG, build_model, observe
from gradleak.data import load_dataset
from gradleak.experiments.common import derive_seeds
from gradleak.metrics import mse
from gradleak.types import Observation


def victim(dataset: str, index: int, seed: int = 0) -> tuple[Observation, torch.Tensor, int, int]:
    """The CLI's victim: a seeded LeNet and a built-in image; returns the attack seed too."""
    data = load_dataset(dataset)
    image, label = data[index]
    model_seed, attack_seed = derive_seeds(seed, 2)
    model = build_model(
        "lenet", input_shape=data.shape, num_classes=data.num_classes, seed=model_seed
    )
    return observe(model, image, torch.tensor(label)), image, label, attack_seed


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_idlg_rebuilds_mnist_digits(index: int) -> None:
    observation, image, label, seed = victim("sample", index)
    result = IDLG()(observation, seed=seed)
    assert int(result.labels[0]) == label
    assert mse(result.inputs[0], image) < 1e-3
    assert result.converged and result.restarts == 0
    assert result.evaluations > result.steps > 0


def test_dlg_learns_the_label_and_the_image() -> None:
    observation, image, label, seed = victim("sample", 0)
    result = DLG()(observation, seed=seed)
    assert int(result.labels[0]) == label
    assert mse(result.inputs[0], image) < 1e-3


def test_improved_recovers_where_the_paper_protocol_blows_up() -> None:
    # Sample 4 (MNIST test digit 2) at seed 0: plain L-BFGS at lr 1 sends the
    # dummy to |x| ~ 1e4 in its first steps; the line search does not.
    observation, image, label, seed = victim("sample", 4)
    faithful = IDLG(iterations=30)(observation, seed=seed)
    assert mse(faithful.inputs[0], image) > 1.0
    improved = IDLG(improved=True)(observation, seed=seed)
    assert int(improved.labels[0]) == label
    assert mse(improved.inputs[0], image) < 1e-3


def test_improved_idlg_rebuilds_a_cifar100_image() -> None:
    observation, image, label, seed = victim("sample-cifar100", 1)
    result = IDLG(improved=True)(observation, seed=seed)
    assert int(result.labels[0]) == label
    assert mse(result.inputs[0], image) < 1e-3


def test_equal_seeds_give_equal_results_and_snapshots_every_k_steps() -> None:
    observation, _, _, seed = victim("sample", 3)
    a = DLG(iterations=12, snapshot_every=5)(observation, seed=seed)
    b = DLG(iterations=12, snapshot_every=5)(observation, seed=seed)
    c = DLG(iterations=12, snapshot_every=5)(observation, seed=seed + 1)
    assert torch.equal(a.inputs, b.inputs) and a.loss_history == b.loss_history
    assert not torch.equal(a.inputs, c.inputs)
    assert [s.step for s in a.snapshots] == [0, 5, 10]
    assert a.steps == 12 and len(a.loss_history) == 12  # the loss after every step (published)
