"""iDLG's label rule, checked on hundreds of real (model, image) pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gradleak.attacks import idlg_label, idlg_label_from_weight_gradient, last_linear_weight
from gradleak.attacks.labels import batch_labels, update_label_counts
from gradleak.data import load_dataset
from gradleak.errors import AttackNotApplicable
from gradleak.models import build_model
from gradleak.threat import observe, observe_update


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


def _confident_batch(seed: int, labels: list[int]) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A last layer over features that point at their class's row: a trained model's confidence.

    Every example puts 82-99% of its softmax on its own class, which is what breaks
    the batch rule (it assumes the examples' softmax outputs alike).
    """
    g = torch.Generator().manual_seed(seed)
    classes, features = 10, 32
    weight = torch.randn(classes, features, generator=g) / features**0.5
    bias = 0.1 * torch.randn(classes, generator=g)
    y = torch.tensor(labels)
    rows = weight[y]
    x = 6.0 * rows / rows.norm(dim=1, keepdim=True) ** 2
    x = x + 0.3 * torch.randn(len(labels), features, generator=g)
    layer = nn.Linear(features, classes)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return nn.Sequential(layer), x, y


@pytest.mark.parametrize(
    ("seed", "labels", "rule_right"),
    [(0, [2, 2, 2, 7], False), (1, [1, 1, 3, 5], False), (11, [0, 4, 4, 4], False),
     (2, [1, 1, 3, 5], True)],
)  # fmt: skip
def test_fitted_logits_read_a_confident_batch(
    seed: int, labels: list[int], rule_right: bool
) -> None:
    model, x, y = _confident_batch(seed, labels)
    observation = observe(model, x, y)
    rule = batch_labels(observation)
    fitted = batch_labels(observation, fit_logits=True)
    # Without the fit the rule's answer stands, and on these batches it is wrong...
    assert (rule.tolist() == labels) is rule_right
    # ...while the fitted logits single out the true multiset, and never spoil a right one.
    assert fitted.tolist() == labels


def test_fitted_logits_keep_the_rule_when_its_proof_holds() -> None:
    # B distinct classes with a negative bias gradient: the rule is exact and no fit runs.
    model, x, y = _confident_batch(3, [0, 4, 6, 9])
    observation = observe(model, x, y)
    assert batch_labels(observation, fit_logits=True).tolist() == [0, 4, 6, 9]


@pytest.mark.parametrize(("seed", "labels"), [(1, [2, 2, 2, 7]), (4, [1, 1, 3, 5])])
def test_fitted_logits_read_a_confident_fedavg_client(seed: int, labels: list[int]) -> None:
    # Four local steps of two examples: the fitted identity holds only approximately
    # (the weights move), which the fit's margin over the rule's residual absorbs.
    model, x, y = _confident_batch(seed, labels)
    observation = observe_update(model, x, y, local_lr=1e-3, local_steps=4, local_batch=2, seed=0)
    truth = torch.bincount(y, minlength=10)
    assert not torch.equal(update_label_counts(observation), truth)
    assert torch.equal(update_label_counts(observation, fit_logits=True), truth)
