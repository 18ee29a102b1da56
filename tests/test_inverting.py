"""Inverting Gradients: the objective's pieces, the FedAvg unrolling, labels, attacks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradleak import build_model, observe, observe_update
from gradleak.attacks import InvertingGradients
from gradleak.attacks.inverting import (
    IGConfig,
    _model_state,
    _Replica,
    attacker_batches,
    cosine_distance,
    dummy_gradient,
    simulate_update,
    total_variation,
    update_labels,
)
from gradleak.data import load_dataset
from gradleak.data.dataset import ImageDataset
from gradleak.errors import ConfigError
from gradleak.metrics import match_reconstructions, psnr
from gradleak.threat import _minibatches

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mnist(data_root: Path) -> ImageDataset:
    return load_dataset("mnist", data_dir=data_root, download=False)


def relu_net(seed: int = 0, *, norm: bool = False) -> nn.Module:
    """A small untrained ReLU conv net for 1x28x28 (torch's default init, from a generator)."""
    width = 8
    layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1)]
    if norm:
        layers.append(nn.BatchNorm2d(width))
    layers += [
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(width * 14 * 14, 10),
    ]
    model = nn.Sequential(*layers)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                bound = 1 / math.sqrt(module.weight[0].numel())
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.uniform_(-bound, bound, generator=generator)
    return model


def images(dataset: ImageDataset, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [dataset[i] for i in indices]
    return torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])


def max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max(float((s.detach() - t).abs().max()) for s, t in zip(a, b, strict=True))


# --- the objective's pieces against slow references ------------------------------------------


def test_cosine_distance_is_one_minus_the_cosine_of_the_concatenated_vectors() -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (10, 36), (10,)]
    a = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    b = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    reference = 1 - F.cosine_similarity(
        torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b]), dim=0
    )
    assert float(cosine_distance(a, b)) == pytest.approx(float(reference), abs=1e-12)
    # Magnitude-invariant, zero on equal directions, two on opposite ones.
    assert float(cosine_distance([3 * t for t in a], a)) == pytest.approx(0, abs=1e-12)
    assert float(cosine_distance([-t for t in a], a)) == pytest.approx(2, abs=1e-12)


def test_total_variation_is_the_mean_of_dx_plus_the_mean_of_dy() -> None:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand((2, 3, 5, 4), generator=generator, dtype=torch.float64)
    n, c, h, w = x.shape
    dx = [
        abs(float(x[i, k, r, s + 1] - x[i, k, r, s]))
        for i in range(n)
        for k in range(c)
        for r in range(h)
        for s in range(w - 1)
    ]
    dy = [
        abs(float(x[i, k, r + 1, s] - x[i, k, r, s]))
        for i in range(n)
        for k in range(c)
        for r in range(h - 1)
        for s in range(w)
    ]
    reference = sum(dx) / len(dx) + sum(dy) / len(dy)
    assert float(total_variation(x)) == pytest.approx(reference, abs=1e-12)
    assert float(total_variation(torch.full((1, 1, 3, 3), 0.5))) == 0.0


def test_the_paper_preset_is_the_papers() -> None:
    config = IGConfig.paper()
    assert (config.iterations, config.lr, config.tv_scale) == (24_000, 0.1, 0.2)
    assert (config.schedule, config.bn_prior, config.signed) == ("step", 0.0, True)
    assert (config.init, config.labels, config.dtype, config.restarts) == (
        "randn",
        "infer",
        "float32",
        0,
    )
    assert config.milestones == (9_000, 15_000, 21_000)
    assert IGConfig.paper(iterations=8).milestones == (3, 5, 7)
    assert IGConfig().milestones == ()  # the plateau rule cuts the step size instead
    with pytest.raises(ConfigError):
        IGConfig(init="zeros")
    with pytest.raises(ConfigError):
        IGConfig(labels="learn")


# --- the replay of the client -------------------------------------------------------------


def test_the_fedsgd_replay_at_the_truth_is_the_shared_gradient_and_leaves_batchnorm_alone(
    mnist: ImageDataset,
) -> None:
    x, y = images(mnist, [0, 1, 2])
    model = relu_net(norm=True)
    observation = observe(model, x, y)
    observation.model.eval()  # the attacker's copy, in whatever mode it keeps it
    before = {k: v.clone() for k, v in observation.model.state_dict().items()}
    replica = _Replica(
        observation.model,
        dict(observation.model.state_dict(keep_vars=True)),
        observation.parameter_names,
        torch.float32,
        CPU,
    )
    assert max_diff(dummy_gradient(replica, x, y), observation.gradients) < 1e-6
    InvertingGradients(iterations=3, snapshot_every=1)(observation, seed=0)
    after = observation.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(module.training for module in observation.model.modules())


@pytest.mark.parametrize("net", ["lenet", "resnet20", "relu-bn"])
@pytest.mark.parametrize(
    "schedule",
    [
        {"epochs": 2, "local_batch": 2},
        {"local_steps": 3, "local_batch": 2},
        {"local_steps": 2, "local_batch": None},
    ],
)
def test_the_unrolling_at_the_truth_and_the_clients_order_is_the_observed_update(
    net: str, schedule: dict, mnist: ImageDataset
) -> None:
    x, y = images(mnist, [3, 4, 5, 6])
    if net == "relu-bn":
        model = relu_net(norm=True)
    else:
        model = build_model(net, input_shape=(1, 28, 28), num_classes=10, seed=0)
    observation = observe_update(model, x, y, local_lr=0.01, seed=5, **schedule)
    replica = _Replica(
        observation.model, observation.sent, observation.parameter_names, torch.float32, CPU
    )
    size = observation.batch_size
    order = _minibatches(4, size, observation.steps, torch.Generator().manual_seed(5))
    simulated = simulate_update(
        replica, x, y, lr=observation.local_lr, batches=order, create_graph=False
    )
    assert max_diff(simulated, observation.update) < 2e-6
    # The attacker's fixed order is not the client's shuffled one: the update differs.
    if schedule.get("local_batch") == 2:
        fixed = attacker_batches(4, size, observation.steps)
        assert [b.tolist() for b in fixed] != [b.tolist() for b in order]
        fixed_update = simulate_update(
            replica, x, y, lr=observation.local_lr, batches=fixed, create_graph=False
        )
        assert max_diff(fixed_update, observation.update) > 1e-5


def test_the_replay_follows_the_clients_eval_mode(mnist: ImageDataset) -> None:
    # A client in eval mode (the server's running statistics, breaching's "public
    # buffers"): the attacker replays eval mode, for a gradient and for an update.
    x, y = images(mnist, [3, 4, 5, 6])
    model = relu_net(norm=True)
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2, generator=torch.Generator().manual_seed(0))
        model[1].running_var.fill_(0.5)
    shared = observe(model, x, y, batchnorm="eval")
    replica = _Replica(
        shared.model,
        _model_state(shared.model),
        shared.parameter_names,
        torch.float32,
        CPU,
        train=False,
    )
    assert max_diff(dummy_gradient(replica, x, y), shared.gradients) < 1e-6
    update = observe_update(
        model, x, y, local_lr=0.01, epochs=1, local_batch=4, seed=0, batchnorm="eval"
    )
    replica = _Replica(
        update.model, update.sent, update.parameter_names, torch.float32, CPU, train=False
    )
    batches = attacker_batches(4, 4, 1)
    simulated = simulate_update(replica, x, y, lr=0.01, batches=batches, create_graph=False)
    assert max_diff(simulated, update.update) < 1e-7
    # Not vacuous: a train-mode replay is another update.
    replica_train = _Replica(update.model, update.sent, update.parameter_names, torch.float32, CPU)
    other = simulate_update(replica_train, x, y, lr=0.01, batches=batches, create_graph=False)
    assert max_diff(other, update.update) > 1e-5


def test_the_attackers_order_is_consecutive_slices_every_epoch() -> None:
    assert [b.tolist() for b in attacker_batches(5, 2, 5)] == [[0, 1], [2, 3], [4], [0, 1], [2, 3]]
    assert [b.tolist() for b in attacker_batches(4, 4, 2)] == [[0, 1, 2, 3]] * 2


# --- labels ---------------------------------------------------------------------------------


def random_batch(
    dataset: ImageDataset, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct labels, as tools/ig_label_rule.py draws them (the same seeds, the same batches)."""
    labels = torch.randperm(dataset.num_classes, generator=generator)[:size]
    pool = torch.from_numpy(dataset.labels.copy())
    indices = []
    for label in labels.tolist():
        candidates = (pool == label).nonzero().flatten()
        indices.append(int(candidates[torch.randint(len(candidates), (1,), generator=generator)]))
    return torch.stack([dataset[i][0] for i in indices]), labels


def test_update_label_rule_is_exact_on_distinct_labels(mnist: ImageDataset) -> None:
    # tools/ig_label_rule.py measured 50 of 50 for LeNet on MNIST, distinct labels,
    # 2 epochs of b=2 at lr 0.001 and one whole-batch step; these are its first batches.
    seed = 7
    generator = torch.Generator().manual_seed(seed)
    for b in range(8):
        x, y = random_batch(mnist, 4, generator)
        model = build_model("lenet", input_shape=(1, 28, 28), num_classes=10, seed=seed + b)
        for schedule in ({"epochs": 2, "local_batch": 2}, {"local_steps": 1}):
            observation = observe_update(model, x, y, local_lr=0.001, seed=b, **schedule)
            assert update_labels(observation).tolist() == sorted(y.tolist()), (b, schedule)


# --- attacks --------------------------------------------------------------------------------


def test_ig_rebuilds_an_mnist_digit_from_a_relu_nets_fedsgd_gradient(mnist: ImageDataset) -> None:
    x, y = images(mnist, [0])
    observation = observe(relu_net(), x, y)
    result = InvertingGradients(IGConfig.paper(iterations=200, snapshot_every=50))(
        observation, seed=0
    )
    assert result.labels.tolist() == y.tolist()  # inferred by iDLG's rule
    assert result.inputs.shape == x.shape
    assert float(result.inputs.min()) >= 0 and float(result.inputs.max()) <= 1  # boxed
    # Measured 24.1 dB (200 steps, the paper's TV 0.2 and step schedule).
    assert psnr(result.inputs, x) > 21.0
    assert result.steps == 200 and result.evaluations == 201 and len(result.loss_history) == 201
    assert [s.step for s in result.snapshots] == [0, 50, 100, 150, 200]
    assert result.final_loss < 0.1 * result.loss_history[0]


def test_ig_rebuilds_a_fedavg_clients_four_digits_with_inferred_labels(
    mnist: ImageDataset,
) -> None:
    x, y = images(mnist, [0, 1, 2, 3])
    observation = observe_update(relu_net(), x, y, local_lr=0.01, epochs=2, local_batch=2, seed=1)
    result = InvertingGradients(IGConfig.paper(iterations=200))(observation, seed=0)
    assert result.labels.tolist() == sorted(y.tolist())
    order, _ = match_reconstructions(result.inputs, x)
    # Measured 24.8 dB mean, 23.5 to 27.3 per image (200 steps).
    assert psnr(result.inputs[order], x) > 20.0


def test_the_attack_steps_as_a_plain_signed_adam_loop_on_the_objective(
    mnist: ImageDataset,
) -> None:
    # The obviously-correct reference: the model's own forward and autograd, cosine
    # similarity of the concatenated gradients, TV by slicing, Adam on the sign,
    # MultiStepLR at 3/8, 5/8, 7/8, clamp.  8 steps cover every decay.
    x_true, y = images(mnist, [7, 8])
    model = relu_net(seed=2)
    observation = observe(model, x_true, y)
    result = InvertingGradients(IGConfig.paper(iterations=8, tv_scale=0.5))(observation, seed=11)

    x = torch.randn((2, 1, 28, 28), generator=torch.Generator().manual_seed(11))
    x.requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=0.1)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimiser, [3, 5, 7], gamma=0.1)
    shared = torch.cat([g.flatten() for g in observation.gradients])
    parameters = list(model.parameters())
    for _ in range(8):
        loss = F.cross_entropy(model(x), torch.tensor(sorted(y.tolist())))
        dummy = torch.autograd.grad(loss, parameters, create_graph=True)
        cosine = F.cosine_similarity(torch.cat([g.flatten() for g in dummy]), shared, dim=0)
        tv = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
        tv = tv + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
        (grad,) = torch.autograd.grad(1 - cosine + 0.5 * tv, [x])
        x.grad = grad.sign()
        optimiser.step()
        scheduler.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    assert torch.allclose(result.inputs, x.detach(), atol=1e-5)


def test_equal_seeds_give_equal_results_and_labels_can_be_given(mnist: ImageDataset) -> None:
    x, y = images(mnist, [5, 6])
    observation = observe(relu_net(), x, y)
    attack = InvertingGradients(IGConfig.paper(iterations=15, restarts=1))
    calls: list[tuple[int, float]] = []
    first = attack(observation, seed=3, callback=lambda step, loss: calls.append((step, loss)))
    assert [step for step, _ in calls] == list(range(30))
    again = attack(observation, seed=3)
    other = attack(observation, seed=4)
    assert torch.equal(first.inputs, again.inputs)
    assert first.loss_history == again.loss_history
    assert not torch.equal(first.inputs, other.inputs)
    assert first.restarts == 1 and first.steps == 30 and len(first.loss_history) == 32
    # The kept trial is the one whose final matching loss is lower.
    replica = _Replica(
        observation.model,
        dict(observation.model.state_dict(keep_vars=True)),
        observation.parameter_names,
        torch.float32,
        CPU,
    )
    dummy = dummy_gradient(replica, first.inputs, first.labels)
    kept = cosine_distance(dummy, observation.gradients)
    finals = (first.loss_history[15], first.loss_history[31])
    assert finals[0] != finals[1]
    assert float(kept.detach()) == pytest.approx(min(finals), abs=1e-6)
    assert not first.converged
    assert InvertingGradients(iterations=2, tolerance=2.0)(observation).converged
    given = InvertingGradients(iterations=2, labels="given")
    assert given(observation, labels=torch.tensor([9, 9])).labels.tolist() == [9, 9]
    with pytest.raises(ConfigError):
        given(observation)


@pytest.mark.parametrize("update", [False, True], ids=["fedsgd", "fedavg"])
def test_parallel_restarts_give_the_sequential_result_bit_for_bit(
    mnist: ImageDataset, update: bool
) -> None:
    # Train-mode BatchNorm, so that each thread's prior hooks its own model copy,
    # and restarts whose trials end differently, so that the choice matters.
    x, y = images(mnist, [5, 6])
    model = relu_net(1, norm=True)
    if update:
        observation = observe_update(
            model, x, y, local_steps=2, local_batch=1, local_lr=0.1, seed=0
        )
    else:
        observation = observe(model, x, y)
    config = IGConfig(iterations=12, window=4, restarts=2, bn_prior=0.1)
    calls: dict[int, list[int]] = {}
    results = {}
    for parallel in (1, 2):
        seen: list[int] = []
        attack = InvertingGradients(config, parallel=parallel)
        results[parallel] = attack(
            observation, seed=5, callback=lambda s, _, seen=seen: seen.append(s)
        )
        calls[parallel] = seen
    one, two = results[1], results[2]
    assert torch.equal(one.inputs, two.inputs)
    assert one.loss_history == two.loss_history
    assert (one.steps, one.evaluations, one.restarts) == (two.steps, two.evaluations, 2)
    assert [s.step for s in one.snapshots] == [s.step for s in two.snapshots]
    assert len(one.loss_history) == one.steps + 3  # every step, then each trial's end
    # The callback saw every step of every trial once, numbered across the trials.
    assert calls[1] == calls[2] == list(range(one.steps))
    with pytest.raises(ConfigError, match="parallel"):
        IGConfig(parallel=0)
