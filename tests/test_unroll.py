"""The attacker's replay of a client's optimiser equals torch.optim, step for step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradleak.attacks.inverting import _Replica, attacker_batches, simulate_update
from gradleak.attacks.unroll import FunctionalOptimizer
from gradleak.threat import _minibatches, observe_update
from gradleak.types import ClientOptimizer

CPU = torch.device("cpu")

OPTIMIZERS = {
    "sgd": ClientOptimizer(),
    "sgd-wd": ClientOptimizer(weight_decay=5e-3),
    "momentum": ClientOptimizer(momentum=0.9),
    "nesterov": ClientOptimizer(momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": ClientOptimizer(kind="adam"),
    "adam-wd": ClientOptimizer(kind="adam", weight_decay=1e-2, betas=(0.8, 0.99)),
    "adamw": ClientOptimizer(kind="adamw", weight_decay=1e-2),
}


def small_net(batchnorm: bool) -> nn.Module:
    """A user's kind of model: conv, (BatchNorm), ReLU, max-pooling, flatten, two Linear."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(1, 4, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 12), nn.ReLU()]
    layers.append(nn.Linear(12, 5))
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_step_equals_torch_optim(name: str) -> None:
    spec = OPTIMIZERS[name]
    generator = torch.Generator().manual_seed(1)
    start = {"w": torch.randn(6, 3, generator=generator, dtype=torch.float64)}
    grads = [torch.randn(6, 3, generator=generator, dtype=torch.float64) for _ in range(5)]
    grads[1][0, 0] = 0.0  # a weight no example touched this step
    reference = start["w"].clone().requires_grad_(True)
    optimiser = spec.build([reference], lr=0.05)
    functional = FunctionalOptimizer(spec, 0.05)
    current = dict(start)
    for g in grads:
        reference.grad = g.clone()
        optimiser.step()
        current = functional.step(current, {"w": g})
        torch.testing.assert_close(current["w"], reference.detach(), rtol=1e-12, atol=1e-14)
    # Not vacuous: the steps moved the weights, and another optimiser moves them elsewhere.
    assert float((current["w"] - start["w"]).abs().max()) > 1e-3
    other = FunctionalOptimizer(ClientOptimizer(kind="adam" if spec.kind == "sgd" else "sgd"), 0.05)
    moved = dict(start)
    for g in grads:
        moved = other.step(moved, {"w": g})
    assert float((moved["w"] - current["w"]).abs().max()) > 1e-4


@pytest.mark.parametrize("name", ["momentum", "nesterov", "adam", "adamw"])
@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_the_unrolled_client_is_the_clients_update(
    name: str, batchnorm: bool, drop_last: bool
) -> None:
    # 11 examples in mini-batches of 4 over 2 epochs: a short last batch of 3, or dropped.
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(11, 1, 8, 8, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 5, (11,), generator=generator)
    model = small_net(batchnorm)
    spec = OPTIMIZERS[name]
    observation = observe_update(
        model, x, y, local_lr=0.05, epochs=2, local_batch=4, seed=3, optimizer=spec,
        drop_last=drop_last,
    )  # fmt: skip
    assert observation.steps == (4 if drop_last else 6)
    order = _minibatches(11, 4, observation.steps, torch.Generator().manual_seed(3),
                         drop_last=drop_last)  # fmt: skip
    assert all(len(b) == 4 for b in order) == drop_last
    replica = _Replica(
        observation.model, observation.sent, observation.parameter_names, torch.float64, CPU
    )
    simulated = simulate_update(
        replica, x, y, lr=0.05, batches=order, create_graph=False, optimizer=spec
    )
    # atol 1e-8: a conv bias ahead of BatchNorm has a gradient of pure rounding (BatchNorm
    # removes any shift), which Adam divides by its own tiny moments; every other entry
    # agrees to 1e-12.
    for a, b in zip(simulated, observation.update, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-8)
    # Plain SGD's replay is another update: the optimiser matters.
    plain = simulate_update(replica, x, y, lr=0.05, batches=order, create_graph=False)
    gaps = [float((a - b).detach().abs().max()) for a, b in zip(plain, simulated, strict=True)]
    assert max(gaps) > 1e-4


def test_the_replay_is_differentiable_in_the_examples_through_adam() -> None:
    generator = torch.Generator().manual_seed(4)
    x = torch.rand(4, 1, 8, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    model = small_net(batchnorm=True)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    names = [n for n, _ in model.named_parameters()]
    replica = _Replica(model, state, names, torch.float64, CPU)
    update = simulate_update(
        replica, x, y, lr=0.01, batches=attacker_batches(4, 2, 4),
        optimizer=OPTIMIZERS["adam"],
    )  # fmt: skip
    (gradient,) = torch.autograd.grad(sum((u * u).sum() for u in update), [x])
    assert torch.isfinite(gradient).all() and float(gradient.abs().max()) > 0


def test_drop_last_leaves_the_short_slice_out() -> None:
    batches = attacker_batches(5, 2, 3, drop_last=True)
    assert [b.tolist() for b in batches] == [[0, 1], [2, 3], [0, 1]]


def test_bad_optimizer_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="momentum"):
        ClientOptimizer(kind="adam", momentum=0.9)
    with pytest.raises(ValueError, match="nesterov"):
        ClientOptimizer(nesterov=True)
    with pytest.raises(ValueError, match="one of"):
        ClientOptimizer(kind="rmsprop")
