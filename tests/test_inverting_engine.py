"""The batched Inverting Gradients engine against the sequential attack, victim by victim."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gradleak import observe, observe_update
from gradleak.attacks import IGConfig, InvertingGradients
from gradleak.attacks.inverting_engine import attack_victims
from gradleak.data import load_dataset
from gradleak.data.dataset import ImageDataset
from gradleak.errors import ConfigError


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mnist(data_root: Path) -> ImageDataset:
    return load_dataset("mnist", data_dir=data_root, download=False)


def relu_bn_net(seed: int) -> nn.Module:
    """A small ReLU + BatchNorm conv net for 1x28x28 (running statistics away from 0 and 1)."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 14 * 14, 10),
    )  # fmt: skip
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                bound = 1 / math.sqrt(module.weight[0].numel())
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.uniform_(-bound, bound, generator=generator)
        model[1].running_mean.uniform_(-0.3, 0.3, generator=generator)
        model[1].running_var.uniform_(0.5, 2.0, generator=generator)
    return model.double()


def batch(data: ImageDataset, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [data[i] for i in range(start, start + size)]
    return torch.stack([x for x, _ in pairs]).double(), torch.tensor([y for _, y in pairs])


def shared_of(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str):
    if kind == "gradient":
        return observe(model, x, y, batchnorm=mode)
    return observe_update(
        model, x, y, local_lr=0.05, local_steps=3, local_batch=1, seed=4, batchnorm=mode
    )


@pytest.mark.parametrize("kind", ["gradient", "update"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("weights", ["shared", "own"])
def test_each_victim_follows_the_sequential_attack(
    kind: str, mode: str, weights: str, mnist: ImageDataset
) -> None:
    size = 2
    observations = []
    for v in range(3):
        model = relu_bn_net(0 if weights == "shared" else v)
        x, y = batch(mnist, 10 * v, size)
        observations.append(shared_of(kind, model, x, y, mode))
    attack = InvertingGradients(
        IGConfig.paper(iterations=4, dtype="float64", snapshot_every=2, restarts=1)
    )
    seeds = [11, 12, 13]
    batched = attack_victims(attack, observations, seeds=seeds)
    for observation, seed, got in zip(observations, seeds, batched, strict=True):
        expected = attack(observation, seed=seed)
        assert torch.allclose(got.inputs, expected.inputs, atol=1e-9, rtol=0)
        assert got.labels.tolist() == expected.labels.tolist()
        assert got.loss_history == pytest.approx(expected.loss_history, abs=1e-10, rel=0)
        assert [s.step for s in got.snapshots] == [s.step for s in expected.snapshots]
        assert (got.steps, got.evaluations, got.restarts) == (
            expected.steps, expected.evaluations, expected.restarts,
        )  # fmt: skip
    # Not vacuous: the victims' reconstructions differ from one another.
    assert not torch.allclose(batched[0].inputs, batched[1].inputs)


def test_known_labels_and_a_mix_of_settings(mnist: ImageDataset) -> None:
    x, y = batch(mnist, 0, 2)
    a = observe(relu_bn_net(0), x, y)
    b = observe(relu_bn_net(0), x[:1], y[:1])
    attack = InvertingGradients(IGConfig.paper(iterations=2, dtype="float64"))
    with pytest.raises(ConfigError, match="victim 1 differs"):
        attack_victims(attack, [a, b], seeds=[0, 1])
    wrong = torch.tensor([(int(y[0]) + 1) % 10, int(y[1])])
    result = attack_victims(attack, [a], seeds=[0], labels=[wrong])[0]
    assert result.labels.tolist() == wrong.tolist()
    with pytest.raises(ConfigError, match="one seed per victim"):
        attack_victims(attack, [a], seeds=[0, 1])
