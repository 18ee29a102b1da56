"""The client side: FedAvg's local round against a plain SGD loop, and the input checks."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradleak import UpdateObservation, build_model, observe, observe_update
from gradleak.data import load_dataset
from gradleak.defenses import prune
from gradleak.errors import ConfigError, DataError
from gradleak.threat import observe_aggregate


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def lenet() -> nn.Module:
    return build_model("lenet", input_shape=(1, 28, 28), num_classes=10, seed=0)


def resnet() -> nn.Module:
    return build_model("resnet20", input_shape=(3, 32, 32), num_classes=100, seed=0)


@pytest.fixture(scope="module")
def mnist(data_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("mnist", data_dir=data_root, download=False)
    pairs = [data[i] for i in range(5)]
    return torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])


@pytest.fixture(scope="module")
def cifar(data_root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("cifar100", data_dir=data_root, download=False)
    pairs = [data[i] for i in range(5)]
    return torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def max_diff(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    return max(float((s - t).abs().max()) for s, t in zip(a, b, strict=True))


# --- one whole-batch step is FedSGD -------------------------------------------------------


@pytest.mark.parametrize("net", ["lenet", "resnet20"])
def test_one_whole_batch_step_is_minus_lr_times_the_fedsgd_gradient(
    net: str, mnist: tuple, cifar: tuple
) -> None:
    model, (x, y) = (lenet(), mnist) if net == "lenet" else (resnet(), cifar)
    x, y = x[:4], y[:4]
    lr = 0.05
    seen = observe_update(model, x, y, local_lr=lr, local_steps=1, seed=0)
    gradient = observe(copy.deepcopy(model), x, y).gradients
    assert seen.parameter_names == tuple(n for n, _ in model.named_parameters())
    assert max_diff(seen.update, tuple(-lr * g for g in gradient)) <= 1e-6
    assert max(float(g.abs().max()) for g in gradient) > 1e-3  # not vacuous


def test_one_step_updates_batchnorm_running_statistics_as_torch_does(cifar: tuple) -> None:
    model, (x, y) = resnet(), cifar
    x, y = x[:4], y[:4]
    seen = observe_update(model, x, y, local_lr=0.05, local_steps=1, seed=0)
    buffers = [n for n, _ in model.named_buffers()]
    assert buffers and set(seen.buffer_names) == set(buffers)
    # The stem's BatchNorm, by hand: momentum 0.1, the batch mean and the unbiased variance.
    with torch.no_grad():
        features = model.stem(x)
    mean = features.mean(dim=(0, 2, 3))
    var = features.var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(seen.returned["stem_bn.running_mean"], 0.1 * mean)
    torch.testing.assert_close(seen.returned["stem_bn.running_var"], 0.9 + 0.1 * var)
    assert int(seen.returned["stem_bn.num_batches_tracked"]) == 1
    # Every buffer: what one forward of the model in train mode leaves behind.
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        reference(x)
    for name, buffer in reference.named_buffers():
        assert torch.equal(seen.returned[name], buffer), name
        assert not torch.equal(seen.returned[name], seen.sent[name]), name


# --- several steps: the same as a plain SGD loop -------------------------------------------


def sgd_for_steps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, b: int, k: int, seed: int
) -> dict[str, torch.Tensor]:
    """K steps: consecutive slices of b of a shuffled order, a new order when it runs out."""
    client = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(client.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    pending: list[torch.Tensor] = []
    for _ in range(k):
        if not pending:
            pending = list(torch.randperm(len(x), generator=generator).split(b))
        index = pending.pop(0)
        optimizer.zero_grad()
        F.cross_entropy(client(x[index]), y[index]).backward()
        optimizer.step()
    return state(client)


def sgd_for_epochs(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, b: int, epochs: int, seed: int
) -> dict[str, torch.Tensor]:
    """E epochs: each a fresh shuffled order, cut into slices of b (the last one shorter)."""
    client = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(client.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=generator).split(b):
            optimizer.zero_grad()
            F.cross_entropy(client(x[index]), y[index]).backward()
            optimizer.step()
    return state(client)


def assert_same_weights(seen: UpdateObservation, expected: dict[str, torch.Tensor]) -> None:
    assert list(seen.returned) == list(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(seen.returned[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    for name, delta in zip(seen.parameter_names, seen.update, strict=True):
        assert torch.equal(delta, seen.returned[name] - seen.sent[name])


@pytest.mark.parametrize("net", ["lenet", "resnet20"])
@pytest.mark.parametrize("n", [4, 3])
def test_k_local_steps_are_a_plain_sgd_loop(net: str, n: int, mnist: tuple, cifar: tuple) -> None:
    model, (x, y) = (lenet(), mnist) if net == "lenet" else (resnet(), cifar)
    x, y = x[:n], y[:n]
    seen = observe_update(model, x, y, local_lr=0.05, local_steps=4, local_batch=2, seed=3)
    assert_same_weights(seen, sgd_for_steps(model, x, y, 0.05, 2, 4, 3))
    assert (seen.local_steps, seen.epochs, seen.local_batch, seen.steps) == (4, None, 2, 4)
    if net == "resnet20":
        assert int(seen.returned["stem_bn.num_batches_tracked"]) == 4


@pytest.mark.parametrize("net", ["lenet", "resnet20"])
@pytest.mark.parametrize("n", [4, 5])
def test_local_epochs_are_a_plain_sgd_loop(net: str, n: int, mnist: tuple, cifar: tuple) -> None:
    model, (x, y) = (lenet(), mnist) if net == "lenet" else (resnet(), cifar)
    x, y = x[:n], y[:n]
    seen = observe_update(model, x, y, local_lr=0.05, epochs=2, local_batch=2, seed=1)
    assert_same_weights(seen, sgd_for_epochs(model, x, y, 0.05, 2, 2, 1))
    assert (seen.local_steps, seen.epochs, seen.steps) == (None, 2, 2 * -(-n // 2))
    # K = E * ceil(n / b) steps are the same round.
    same = observe_update(model, x, y, local_lr=0.05, local_steps=seen.steps, local_batch=2, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(seen.update, same.update, strict=True))


# --- what the server holds, and what stays with the client ---------------------------------


def test_the_global_model_is_unchanged_and_the_server_gets_a_copy(cifar: tuple) -> None:
    model, (x, y) = resnet(), cifar
    before, mode = state(model), model.training
    seen = observe_update(model, x[:4], y[:4], local_lr=0.1, epochs=2, local_batch=2, seed=0)
    after = state(model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert model.training == mode and all(p.grad is None for p in model.parameters())
    assert seen.model is not model
    assert all(torch.equal(seen.sent[n], t) for n, t in before.items())
    assert all(torch.equal(t, before[n]) for n, t in seen.model.state_dict().items())
    assert list(seen.sent) == list(seen.returned) == list(before)
    assert (seen.num_examples, seen.input_shape, seen.num_classes) == (4, (3, 32, 32), 100)
    assert seen.local_lr == 0.1 and not hasattr(seen, "seed")


def test_seeds_fix_the_order_and_only_matter_for_mini_batches(mnist: tuple) -> None:
    model, (x, y) = lenet(), mnist
    x, y = x[:4], y[:4]

    def update(seed: int, b: int | None) -> tuple[torch.Tensor, ...]:
        return observe_update(
            model, x, y, local_lr=0.05, local_steps=3, local_batch=b, seed=seed
        ).update

    assert max_diff(update(0, 2), update(0, 2)) == 0.0
    assert max_diff(update(0, 2), update(1, 2)) > 1e-4
    assert max_diff(update(0, None), update(1, None)) == 0.0  # whole batch: no order to draw
    assert max_diff(update(0, 4), update(1, None)) == 0.0


def test_the_defense_applies_to_the_final_update(mnist: tuple) -> None:
    model, (x, y) = lenet(), mnist
    plain = observe_update(model, x, y, local_lr=0.05, local_steps=3, local_batch=2, seed=0)
    defended = observe_update(
        model, x, y, local_lr=0.05, local_steps=3, local_batch=2, seed=0, defense=prune(0.5)
    )
    expected = prune(0.5)(plain.update)
    assert all(torch.equal(a, b) for a, b in zip(defended.update, expected, strict=True))
    for name in defended.parameter_names:
        sent_plus = defended.sent[name] + defended.parameter_update(name)
        assert torch.equal(defended.returned[name], sent_plus)


def test_a_single_example_without_its_batch_dimension(mnist: tuple) -> None:
    model, (x, y) = lenet(), mnist
    seen = observe_update(model, x[0], y[0], local_lr=0.05, local_steps=2, seed=0)
    assert seen.num_examples == 1 and seen.input_shape == (1, 28, 28)
    again = observe_update(model, x[:1], y[:1], local_lr=0.05, local_steps=2, seed=0)
    assert max_diff(seen.update, again.update) == 0.0


# --- input checks -------------------------------------------------------------------------


def images(n: int = 2, shape: tuple[int, ...] = (1, 28, 28)) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(0))


def with_pixel(value: float) -> torch.Tensor:
    x = images()
    x[1, 0, 3, 4] = value
    return x


ENTRIES: dict[str, Callable] = {
    "observe": lambda m, x, y: observe(m, x, y),
    "observe_aggregate": lambda m, x, y: observe_aggregate(m, [(x, y)]),
    "observe_update": lambda m, x, y: observe_update(m, x, y, local_lr=0.1, local_steps=1, seed=0),
}

BAD_BATCHES = {
    "count": (lambda: images(2), lambda: torch.tensor([1]), "2 images but 1 labels"),
    "numpy": (lambda: images(2).numpy(), lambda: torch.tensor([1, 2]), "numpy"),
    "labels numpy": (lambda: images(2), lambda: torch.tensor([1, 2]).numpy(), "numpy"),
    "float64": (lambda: images(2).double(), lambda: torch.tensor([1, 2]), r"float64.*\.float\(\)"),
    "nan": (lambda: with_pixel(float("nan")), lambda: torch.tensor([1, 2]), "example 1.*NaN"),
    "inf": (lambda: with_pixel(float("inf")), lambda: torch.tensor([1, 2]), "infinite"),
    "uint8": (
        lambda: (images(2) * 255).to(torch.uint8),
        lambda: torch.tensor([1, 2]),
        "uint8, not floating",
    ),
    "float labels": (lambda: images(2), lambda: torch.tensor([1.0, 2.0]), "not integer"),
    "one-hot": (lambda: images(2), lambda: torch.eye(10)[:2].long(), "one-hot"),
    "label too big": (lambda: images(2), lambda: torch.tensor([1, 10]), "label 10 is outside"),
    "negative label": (lambda: images(2), lambda: torch.tensor([-1, 2]), "label -1 is outside"),
    "channels": (
        lambda: images(2, (3, 28, 28)),
        lambda: torch.tensor([1, 2]),
        "takes 1 input channels but gets 3",
    ),
    "size": (
        lambda: images(2, (1, 32, 32)),
        lambda: torch.tensor([1, 2]),
        r"\(1, 32, 32\) do not fit.*'fc' \(Linear\) takes 588 input features but gets 768",
    ),
    "no channel axis": (
        lambda: images(2, (28, 28)),
        lambda: torch.tensor([1, 2]),
        r"takes input \(batch, channels, height, width\) but gets shape \(1, 28, 28\)",
    ),
    "empty": (lambda: images(0), lambda: torch.zeros(0, dtype=torch.long), "empty"),
}


def assert_one_line(error: pytest.ExceptionInfo) -> None:
    message = str(error.value)
    assert message and "\n" not in message and message == message.strip()


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case", BAD_BATCHES)
def test_a_batch_that_does_not_fit_the_model_is_refused_in_one_line(entry: str, case: str) -> None:
    make_x, make_y, pattern = BAD_BATCHES[case]
    model = lenet()
    with pytest.raises(DataError, match=pattern) as error:
        ENTRIES[entry](model, make_x(), make_y())
    assert_one_line(error)


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_forward_that_fails_is_refused_in_one_line(entry: str) -> None:
    model = nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(DataError, match=r"images of shape \(700,\) do not fit the model") as error:
        ENTRIES[entry](model, torch.rand(2, 700), torch.tensor([1, 2]))
    assert_one_line(error)


def test_the_checks_leave_batchnorm_statistics_alone() -> None:
    model = resnet()
    before = state(model)
    with pytest.raises(DataError, match="label 100 is outside"):
        observe(model, images(2, (3, 32, 32)), torch.tensor([1, 100]))
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in before.items())
    assert model.training


BAD_SCHEDULES = {
    "lr zero": ({"local_lr": 0.0, "local_steps": 1}, "local_lr must be finite and above 0"),
    "lr negative": ({"local_lr": -0.1, "local_steps": 1}, "above 0, got -0.1"),
    "lr nan": ({"local_lr": float("nan"), "local_steps": 1}, "got nan"),
    "lr inf": ({"local_lr": float("inf"), "local_steps": 1}, "got inf"),
    "lr string": ({"local_lr": "0.1", "local_steps": 1}, "local_lr must be a number"),
    "zero steps": ({"local_lr": 0.1, "local_steps": 0}, "local_steps must be .* at least 1"),
    "zero epochs": ({"local_lr": 0.1, "epochs": 0}, "epochs must be .* at least 1"),
    "both": ({"local_lr": 0.1, "local_steps": 2, "epochs": 1}, "exactly one of local_steps"),
    "neither": ({"local_lr": 0.1}, "exactly one of local_steps"),
    "batch zero": ({"local_lr": 0.1, "local_steps": 1, "local_batch": 0}, "between 1 and .* 2"),
    "batch too big": ({"local_lr": 0.1, "epochs": 1, "local_batch": 3}, "got 3"),
}


@pytest.mark.parametrize("case", BAD_SCHEDULES)
def test_an_impossible_local_schedule_is_refused_in_one_line(case: str) -> None:
    options, pattern = BAD_SCHEDULES[case]
    with pytest.raises(ConfigError, match=pattern) as error:
        observe_update(lenet(), images(2), torch.tensor([1, 2]), seed=0, **options)
    assert_one_line(error)


def test_plain_python_int_labels_are_still_accepted() -> None:
    model = lenet()
    seen = observe(model, images(1)[0], 3)
    assert seen.batch_size == 1 and seen.num_classes == 10


def test_observe_leaves_the_servers_batchnorm_statistics_alone(cifar: tuple) -> None:
    # The client's train-mode forward moves BatchNorm's running statistics; they
    # belong to the client's copy, not to the model the server (and attacker) holds.
    images, labels = cifar
    model = build_model("resnet20", input_shape=(3, 32, 32), num_classes=100, seed=0)
    before = copy.deepcopy(model.state_dict())
    seen = observe(model, images[:2], labels[:2])
    assert seen.model is model
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


# --- the client's BatchNorm mode -------------------------------------------------------------


def trained_like_resnet() -> nn.Module:
    """resnet20 with running statistics away from (0, 1), so the two modes differ."""
    model = resnet()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
    return model


def test_observe_in_eval_mode_is_the_gradient_of_the_eval_mode_model(cifar: tuple) -> None:
    x, y = cifar[0][:2], cifar[1][:2]
    model = trained_like_resnet()  # built in train mode
    seen = observe(model, x, y, batchnorm="eval")
    reference = copy.deepcopy(model).eval()
    expected = torch.autograd.grad(F.cross_entropy(reference(x), y), list(reference.parameters()))
    assert seen.batchnorm == "eval"
    assert max_diff(seen.gradients, tuple(expected)) <= 1e-6
    # Not vacuous: the train-mode gradient is another one.
    assert max_diff(observe(model, x, y).gradients, tuple(expected)) > 1e-3
    assert model.training  # the server's model keeps its mode
    assert observe(model, x, y).batchnorm == "train"
    assert observe(copy.deepcopy(model).eval(), x, y).batchnorm == "eval"  # the model's own


def test_observe_update_in_eval_mode_keeps_the_running_statistics(cifar: tuple) -> None:
    x, y = cifar[0][:4], cifar[1][:4]
    model = trained_like_resnet()
    seen = observe_update(
        model, x, y, local_lr=0.05, local_steps=2, local_batch=2, seed=0, batchnorm="eval"
    )
    assert seen.batchnorm == "eval"
    for name in seen.buffer_names:
        assert torch.equal(seen.returned[name], seen.sent[name]), name
    # One whole-batch step in eval mode is -lr times the eval-mode gradient.
    one = observe_update(model, x, y, local_lr=0.05, local_steps=1, seed=0, batchnorm="eval")
    gradient = observe(model, x, y, batchnorm="eval").gradients
    assert max_diff(one.update, tuple(-0.05 * g for g in gradient)) <= 1e-6
    with pytest.raises(ConfigError, match="batchnorm must be"):
        observe_update(model, x, y, local_lr=0.05, local_steps=1, seed=0, batchnorm="frozen")
