"""Defenses: each transform is what it claims, against a slow, obviously-correct reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from gradleak import build_model, observe
from gradleak.defenses import (
    DEFENSES,
    bf16,
    build_defense,
    compose,
    dp_sgd,
    epsilon,
    fp16,
    gaussian,
    int8,
    laplacian,
    parse_strengths,
    prune,
)
from gradleak.errors import ConfigError
from gradleak.threat import client_gradients, observe_aggregate


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def lenet(seed: int = 0) -> torch.nn.Module:
    return build_model("lenet", input_shape=(1, 28, 28), num_classes=10, seed=seed)


def batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(10, (n,), generator=g)


def tensors(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(shape, generator=g) for shape in [(7,), (3, 5), (12, 1, 5, 5), (10, 33)]
    )


# --- aggregation -------------------------------------------------------------------------


def test_aggregation_is_the_mean_of_the_clients_gradients() -> None:
    model, (x, y) = lenet(), batch(4)
    clients = [(x[i], y[i]) for i in range(4)]
    seen = observe_aggregate(model, clients)
    one_by_one = [observe(model, xi, yi).gradients for xi, yi in clients]
    for k, shared in enumerate(seen.gradients):
        assert torch.allclose(shared, sum(g[k] for g in one_by_one) / 4, atol=1e-7)
    assert seen.batch_size == 4
    # A batch of 4 in one client shares the same gradient (mean cross-entropy).
    for a, b in zip(observe(model, x, y).gradients, seen.gradients, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_each_client_applies_its_transform_before_aggregation() -> None:
    model, (x, y) = lenet(), batch(3)
    clients = [(x[i : i + 1], y[i : i + 1]) for i in range(3)]
    seen = observe_aggregate(model, clients, defense=prune(0.5))
    pruned = [prune(0.5)(client_gradients(model, xi, yi)) for xi, yi in clients]
    for k, shared in enumerate(seen.gradients):
        assert torch.allclose(shared, sum(g[k] for g in pruned) / 3, atol=1e-7)
    # The mean of pruned gradients is not the pruned mean: the transform runs per client.
    assert not torch.equal(seen.gradients[-2], prune(0.5)(observe(model, x, y).gradients)[-2])


# --- pruning -----------------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.99, 1.0])
def test_pruning_zeroes_exactly_the_smallest_share_of_each_tensor(share: float) -> None:
    original = tensors()
    for before, after in zip(original, prune(share)(original), strict=True):
        zeroed = after == 0
        assert int(zeroed.sum()) == math.floor(share * before.numel() + 1e-9)
        assert torch.equal(after[~zeroed], before[~zeroed])  # the rest is sent unchanged
        if zeroed.any() and (~zeroed).any():
            assert before[zeroed].abs().max() <= before[~zeroed].abs().min()


def test_pruning_breaks_ties_without_zeroing_more() -> None:
    (after,) = prune(0.5)((torch.ones(10),))
    assert int((after == 0).sum()) == 5


# --- precision ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transform", "dtype", "bits"), [(fp16, torch.float16, 11), (bf16, torch.bfloat16, 8)]
)
def test_casts_are_the_round_trip_they_claim(transform, dtype, bits) -> None:  # noqa: ANN001
    original = tensors()
    sent = transform()(original)
    for before, after in zip(original, sent, strict=True):
        assert after.dtype == before.dtype
        assert torch.equal(after, before.to(dtype).to(before.dtype))
        assert not torch.equal(after, before)  # random floats are not representable
        assert ((after - before).abs() <= before.abs() * 2.0**-bits).all()  # rounded to nearest
    assert all(torch.equal(a, b) for a, b in zip(transform()(sent), sent, strict=True))


def test_int8_is_symmetric_per_tensor_quantisation() -> None:
    original = (*tensors(), torch.zeros(4))
    for before, after in zip(original, int8()(original), strict=True):
        peak = float(before.abs().max())
        if peak == 0:
            assert torch.equal(after, before)
            continue
        scale = peak / 127
        levels = after / scale
        assert torch.allclose(levels, levels.round(), atol=1e-4)  # integer multiples of s
        assert int(levels.round().abs().max()) == 127
        assert len(levels.round().unique()) <= 255
        assert ((after - before).abs() <= scale / 2 + 1e-6).all()


# --- noise -------------------------------------------------------------------------------


def _moments(x: torch.Tensor) -> tuple[float, float, float]:
    x = x.double().flatten()
    centred = x - x.mean()
    std = float(centred.pow(2).mean().sqrt())
    return float(x.mean()), std, float(centred.pow(4).mean() / std**4)


@pytest.mark.parametrize("scale", [1e-3, 1e-1])
def test_gaussian_noise_has_the_stated_scale(scale: float) -> None:
    (noise,) = gaussian(scale, seed=3)((torch.zeros(200_000),))
    mean, std, kurtosis = _moments(noise)
    assert abs(std / scale - 1) < 0.01  # the sample std's error is about 0.16% here
    assert abs(mean) < 5 * scale / math.sqrt(200_000)
    assert abs(kurtosis - 3) < 0.1


def test_laplacian_noise_has_the_stated_scale() -> None:
    b = 1e-2
    (noise,) = laplacian(b, seed=3)((torch.zeros(200_000),))
    mean, std, kurtosis = _moments(noise)
    assert abs(std / (math.sqrt(2) * b) - 1) < 0.015
    assert abs(float(noise.abs().mean()) / b - 1) < 0.01  # E|X| = b
    assert abs(kurtosis - 6) < 0.5  # heavier tails than a Gaussian's 3
    assert abs(mean) < 5 * std / math.sqrt(200_000)


def test_noise_is_seeded_explicitly_and_leaves_the_global_stream_alone() -> None:
    state = torch.random.get_rng_state()
    grads = tensors()
    first, again, other = (gaussian(0.1, seed=s)(grads) for s in (5, 5, 6))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert torch.equal(torch.random.get_rng_state(), state)


def test_compose_applies_in_order() -> None:
    grads = tensors()
    composed = compose(prune(0.3), gaussian(1e-3, seed=1))(grads)
    by_hand = gaussian(1e-3, seed=1)(prune(0.3)(grads))
    assert all(torch.equal(a, b) for a, b in zip(composed, by_hand, strict=True))
    # Noise after pruning fills the pruned entries again; the other order keeps them zero.
    assert int((composed[1] == 0).sum()) == 0
    assert int((compose(gaussian(1e-3, seed=1), prune(0.3))(grads)[1] == 0).sum()) == 4
    seen = observe(lenet(), *batch(1), defense=compose(prune(0.3), fp16()))
    assert all(torch.equal(g, g.half().float()) for g in seen.gradients)


# --- DP-SGD ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook")
def test_dpsgd_gradient_is_what_the_opacus_optimizer_steps_with() -> None:
    from opacus import PrivacyEngine

    model, (x, y) = lenet(), batch(4)
    sigma, clip, seed = 0.5, 1.0, 11
    seen = observe(model, x, y, step=dp_sgd(sigma, max_grad_norm=clip, seed=seed))

    # The ordinary Opacus training path: one step of plain SGD, lr 1, on the same batch.
    trained = lenet()
    before = [p.detach().clone() for p in trained.parameters()]
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    module, optimizer, loader = PrivacyEngine().make_private(
        module=trained,
        optimizer=torch.optim.SGD(trained.parameters(), lr=1.0),
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        poisson_sampling=False,
        noise_generator=torch.Generator().manual_seed(seed),
    )
    xb, yb = next(iter(loader))
    optimizer.zero_grad()
    F.cross_entropy(module(xb), yb).backward()
    optimizer.step()
    for shared, old, new in zip(seen.gradients, before, trained.parameters(), strict=True):
        assert torch.allclose(shared, old - new.detach(), atol=1e-6)
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), lenet().parameters(), strict=True)
    )


def test_dpsgd_without_noise_averages_clipped_per_example_gradients() -> None:
    model, (x, y) = lenet(), batch(3)
    seen = observe(model, x, y, step=dp_sgd(0.0, max_grad_norm=0.5))
    per_example = [client_gradients(model, x[i : i + 1], y[i : i + 1]) for i in range(3)]
    clipped = []
    for grads in per_example:
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        assert norm > 0.5  # so the clipping is exercised
        clipped.append([g * 0.5 / (norm + 1e-6) for g in grads])
    for k, shared in enumerate(seen.gradients):
        assert torch.allclose(shared, sum(c[k] for c in clipped) / 3, atol=1e-6)


def test_epsilon_falls_as_noise_grows() -> None:
    values = [epsilon(s, sample_rate=0.004, steps=250, delta=1e-5) for s in (0.5, 1.0, 2.0)]
    assert values[0] > values[1] > values[2] > 0
    assert epsilon(0.0, sample_rate=0.004, steps=250) == math.inf


# --- registry ----------------------------------------------------------------------------


def test_every_registered_defense_builds_and_observes() -> None:
    model, (x, y) = lenet(), batch(8)
    for name, spec in DEFENSES.items():
        strength = spec.sweep[-1] if spec.sweep else None
        defense = build_defense(name, strength, seed=0)
        n = defense.clients * defense.examples
        clients = [(x[i * defense.examples : (i + 1) * defense.examples],
                    y[i * defense.examples : (i + 1) * defense.examples])
                   for i in range(defense.clients)]  # fmt: skip
        seen = observe_aggregate(model, clients, defense=defense.transform, step=defense.step)
        assert seen.batch_size == n
        assert all(torch.isfinite(g).all() for g in seen.gradients)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("gaussian", "-1", "0 or more"),
        ("gaussian", "abc", "not a number"),
        ("gaussian", "nan", "finite"),
        ("prune", "1.5", "between 0 and 1"),
        ("aggregate", "2.5", "whole number"),
        ("aggregate", "0", "1 or more"),
    ],
)
def test_bad_strengths_are_config_errors(name: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_strengths(text, name)


def test_unknown_names_and_knobless_strengths_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown defense"):
        build_defense("rot13")
    with pytest.raises(ConfigError, match="takes no strength"):
        build_defense("fp16", 0.5)
    assert parse_strengths("0.1, 0.01,0.1", "gaussian") == (0.1, 0.01)
