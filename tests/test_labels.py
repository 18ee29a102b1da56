"""iDLG's label rule, checked on hundreds of real (model, image) pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gradleak.attacks import idlg_label, idlg_label_from_weight_gradient, last_linear_weight
from gradleak.data import load_dataset
from gradleak.errors import AttackNotApplicable
from gradleak.models import build_model
from gradleak.threat import observe


@pytest.mark.parametrize(("name", "pairs"), [("mnist", 70), ("cifar100", 70), ("lfw", 70)])
def test_idlg_rule_is_right_on_every_pair(data_root: Path, name: str, pairs: int) -> None:
    # 210 pairs in all: a fresh uniform-init LeNet and a random real image each.
    dataset = load_dataset(name, data_dir=data_root, download=False)
    rng = torch.Generator().manual_seed(1234)
    indices = torch.randint(len(dataset), (pairs,), generator=rng).tolist()
    wrong = []
    for i, index in enumerate(indices):
        image, label = dataset[index]
        model = build_model(
            "lenet", input_shape=dataset.shape, num_classes=dataset.num_classes, seed=10_000 + i
        )
        if idlg_label(observe(model, image, torch.tensor(label))) != label:
            wrong.append((index, label))
    assert not wrong, f"iDLG rule wrong on {len(wrong)}/{pairs} {name} pairs: {wrong[:5]}"


def test_rule_agrees_with_brute_force() -> None:
    # Slow reference: the true label is the only one whose replayed gradient
    # (with the true image) reproduces the shared last-layer gradient.
    image = torch.rand(1, 28, 28, generator=torch.Generator().manual_seed(0))
    model = build_model("lenet", input_shape=(1, 28, 28), num_classes=10, seed=5)
    observation = observe(model, image, torch.tensor(6))
    name = last_linear_weight(model)
    target = observation.gradient(name)
    distances = [
        float((observe(model, image, torch.tensor(c)).gradient(name) - target).abs().sum())
        for c in range(10)
    ]
    brute = min(range(10), key=distances.__getitem__)
    assert brute == 6 == idlg_label(observation)
    assert idlg_label_from_weight_gradient(target) == 6


def test_rule_refuses_batches_and_models_without_a_linear_layer() -> None:
    model = build_model("lenet", input_shape=(1, 28, 28), num_classes=10, seed=0)
    batch = observe(model, torch.rand(2, 1, 28, 28), torch.tensor([1, 2]))
    with pytest.raises(AttackNotApplicable, match="averages 2"):
        idlg_label(batch)
    conv_only = nn.Sequential(nn.Conv2d(1, 10, 28), nn.Flatten())
    observation = observe(conv_only, torch.rand(1, 28, 28), torch.tensor(3))
    with pytest.raises(AttackNotApplicable, match="final Linear layer"):
        idlg_label(observation)
