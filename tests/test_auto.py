"""--method auto: which attack it picks for which observation, and that the pick works."""

from __future__ import annotations

import copy

import pytest
import torch

from gradleak import build_model, observe, observe_update
from gradleak.attacks import IDLG, InvertingGradients
from gradleak.attacks.auto import choose_attack, one_step_gradient, piecewise_linear_layers
from gradleak.data import load_dataset


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("sample")  # built in: no data folder needed
    pairs = [data[i] for i in range(4)]
    return torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])


def lenet() -> torch.nn.Module:
    return build_model("lenet", input_shape=(1, 28, 28), num_classes=10, seed=0)


def convnet() -> torch.nn.Module:
    return build_model("convnet", input_shape=(1, 28, 28), num_classes=10, seed=0, width=4)


def test_a_smooth_models_gradient_gets_improved_idlg_with_the_closed_form(digits: tuple) -> None:
    x, y = digits
    choice = choose_attack(observe(lenet(), x[:1], y[:1]))
    assert isinstance(choice.attack, IDLG) and choice.attack.config.improved
    assert choice.method == "idlg" and "closed-form start" in choice.reason
    # A batch: still improved iDLG (the batch label rule), without the closed form.
    batch = choose_attack(observe(lenet(), x, y), iterations=7)
    assert isinstance(batch.attack, IDLG) and "batch label rule" in batch.reason
    assert "mid-grey" in batch.reason and batch.attack.config.iterations == 7


def test_relu_models_and_multi_step_updates_get_inverting_gradients(digits: tuple) -> None:
    x, y = digits
    assert piecewise_linear_layers(lenet()) == []
    assert piecewise_linear_layers(convnet())[0] == "features.0.2"
    relu = choose_attack(observe(convnet(), x[:1], y[:1]), iterations=5)
    assert isinstance(relu.attack, InvertingGradients) and relu.method == "ig"
    assert "piecewise-linear" in relu.reason and relu.attack.config.iterations == 5
    update = observe_update(lenet(), x, y, local_lr=0.01, local_steps=2, local_batch=2, seed=0)
    several = choose_attack(update)
    assert isinstance(several.attack, InvertingGradients) and several.observation is update
    assert "2 local steps (sgd)" in several.reason


def test_a_one_step_update_is_attacked_as_the_gradient_it_amounts_to(digits: tuple) -> None:
    x, y = digits
    model = lenet()
    update = observe_update(model, x[:1], y[:1], local_lr=0.05, local_steps=1, seed=0)
    choice = choose_attack(update)
    assert isinstance(choice.attack, IDLG) and choice.observation is not update
    assert choice.reason.startswith("one local step on the whole batch")
    gradient = observe(copy.deepcopy(model), x[:1], y[:1]).gradients
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(one_step_gradient(update).gradients, gradient, strict=True)
    )
    assert diff < 1e-5  # -update/lr in float32 against the gradient itself
    result = choice.attack(choice.observation, seed=0)
    assert result.labels.tolist() == y[:1].tolist()
    assert float(((result.inputs - x[:1]) ** 2).mean()) < 1e-6
