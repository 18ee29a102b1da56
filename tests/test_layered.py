"""The vmap-free objectives of plain nets (autograd and explicit) against the vmapped one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradleak import build_model, observe
from gradleak.attacks.explicit import plain_blocks
from gradleak.attacks.labels import batch_labels
from gradleak.attacks.layered import plain_layers, stacked_forward, unfolded_size
from gradleak.attacks.objective import BatchedObjective


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def observations(
    model: str,
    shape: tuple[int, int, int],
    batch: int,
    count: int,
    dtype: torch.dtype = torch.float64,
) -> list:
    """Seeded victims; the client computes in `dtype`.

    In float64 the shared gradient of one example is rank one to float64's
    rounding, so the explicit path's factors give the plain objective to
    round-off; in float32 they agree to float32's (see lowrank.py).
    """
    generator = torch.Generator().manual_seed(7)
    classes = 10
    out = []
    for v in range(count):
        net = build_model(model, input_shape=shape, num_classes=classes, seed=v).to(dtype)
        x = torch.rand(batch, *shape, generator=generator, dtype=dtype)
        y = torch.randperm(classes, generator=generator)[:batch]
        out.append(observe(net, x, y))
    return out


@pytest.mark.parametrize("name", ["lenet", "lenet-dlg"])
def test_lenets_are_plain_and_their_stacked_forward_is_the_model(name: str) -> None:
    model = build_model(name, input_shape=(3, 32, 32), num_classes=100, seed=1)
    layers = plain_layers(model, (3, 32, 32))
    assert layers is not None
    assert [layer.kind for layer in layers] == ["conv", "activation"] * 3 + ["flatten", "linear"]
    x = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    stacked = {n: p.detach()[None].expand(2, *p.shape) for n, p in model.named_parameters()}
    with torch.no_grad():
        ours = stacked_forward(layers, stacked, x)
        torch.testing.assert_close(ours[1], model(x[1]), rtol=1e-4, atol=1e-4)


def test_nets_that_are_not_plain_are_refused() -> None:
    class Reordered(nn.Module):  # registers fc first but runs it last
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12 * 8 * 8, 10)
            self.conv = nn.Conv2d(3, 12, 5, padding=2, stride=4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.sigmoid(self.conv(x)).flatten(1))

    class Doubled(nn.Sequential):  # the same layers, but the forward adds a skip
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    resnet = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10, seed=0)
    doubled = Doubled(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    shape = (3, 32, 32)
    assert plain_layers(resnet, shape) is None
    assert plain_layers(Reordered(), shape) is None
    assert plain_layers(doubled, shape) is None
    assert plain_layers(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), shape) is not None


def test_unfolded_size_counts_every_patch_entry() -> None:
    expected = {  # sum over conv layers of in_channels * 25 * output pixels
        ("lenet", (1, 28, 28)): 1 * 25 * 14 * 14 + 2 * 12 * 25 * 7 * 7,
        ("lenet", (3, 32, 32)): 3 * 25 * 16 * 16 + 12 * 25 * 8 * 8 + 12 * 25 * 8 * 8,
        ("lenet-dlg", (3, 32, 32)): (3 + 12 + 12) * 25 * 32 * 32,
    }
    for (name, shape), entries in expected.items():
        model = build_model(name, input_shape=shape, num_classes=10, seed=0)
        layers = plain_layers(model, shape)
        assert layers is not None
        assert unfolded_size(layers, dict(model.named_parameters()), shape) == entries


def three_paths(objective: BatchedObjective, z: torch.Tensor, rows: list[int]) -> list:
    """(loss, gradient) at `z` for the victims `rows`: vmapped, stacked autograd, explicit."""
    results = []
    for path in ("vmapped", "stacked", "explicit"):
        objective.use(path)
        objective.select(torch.tensor(rows))
        results.append(objective(z[: len(rows)]))
    return results


@pytest.mark.parametrize(
    ("model", "shape"),
    [("lenet", (1, 28, 28)), ("lenet", (3, 32, 32)), ("lenet-dlg", (3, 12, 12))],
)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("learned", [False, True], ids=["known labels", "learned labels"])
def test_stacked_and_explicit_objectives_equal_the_vmapped_one(
    model: str, shape: tuple[int, int, int], batch: int, learned: bool
) -> None:
    victims = observations(model, shape, batch, 5)
    labels = None if learned else torch.stack([batch_labels(o) for o in victims])
    objective = BatchedObjective(victims, labels, torch.float64)
    generator = torch.Generator().manual_seed(3)
    z = torch.rand(5, objective.size, generator=generator, dtype=torch.float64)
    (loss_v, grad_v), *others = three_paths(objective, z, [4, 1, 2])  # a subset, out of order
    assert bool((loss_v > 0).all())
    for loss, gradient in others:
        torch.testing.assert_close(loss, loss_v, rtol=1e-10, atol=0)
        torch.testing.assert_close(
            gradient, grad_v, rtol=1e-9, atol=1e-12 * float(grad_v.abs().max())
        )


def test_explicit_objective_handles_tanh_stacked_linear_layers_and_missing_biases() -> None:
    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False), nn.Tanh(),
            nn.Conv2d(4, 3, 3, padding=0), nn.Sigmoid(),
            nn.Flatten(), nn.Linear(3 * 3 * 3, 7), nn.Tanh(),
            nn.Linear(7, 5, bias=False), nn.Sigmoid(),
        )  # fmt: skip

    generator = torch.Generator().manual_seed(1)
    victims = [
        observe(net(v), torch.rand(2, 2, 9, 9, generator=generator), torch.tensor([v % 5, 3]))
        for v in range(3)
    ]
    objective = BatchedObjective(victims, None, torch.float64)
    assert objective._blocks is not None and objective.path == "explicit"
    assert [(b.kind, b.activation, b.bias is not None) for b in objective._blocks] == [
        ("conv", "tanh", False), ("conv", "sigmoid", True),
        ("linear", "tanh", True), ("linear", "sigmoid", False),
    ]  # fmt: skip
    z = torch.randn(3, objective.size, generator=generator, dtype=torch.float64)
    (loss_v, grad_v), _, (loss_e, grad_e) = three_paths(objective, z, [2, 0, 1])
    torch.testing.assert_close(loss_e, loss_v, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad_e, grad_v, rtol=1e-9, atol=1e-12 * float(grad_v.abs().max()))


def test_layouts_the_explicit_objective_does_not_write_out_are_left_to_autograd() -> None:
    def blocks_of(*modules: nn.Module, shape: tuple[int, ...] = (1, 6, 6)) -> list | None:
        layers = plain_layers(nn.Sequential(*modules), shape)
        assert layers is not None  # plain: the autograd paths take it
        return plain_blocks(layers)

    conv = nn.Conv2d(1, 2, 3, padding=1)
    assert blocks_of(conv, nn.Sigmoid(), nn.Flatten(), nn.Linear(72, 3)) is not None
    assert blocks_of(nn.Flatten(), nn.Sigmoid(), nn.Linear(36, 3)) is None  # activation first
    assert blocks_of(conv, nn.Sigmoid(), nn.Tanh(), nn.Flatten(), nn.Linear(72, 3)) is None
    assert blocks_of(conv, nn.Sigmoid()) is None  # no linear layer at the end


def test_every_lenet_is_written_out_and_the_stacked_path_keeps_its_cap() -> None:
    # Grouped convolutions need no unfolded patches, so the explicit path takes
    # the wide stride-free LeNet too; the stacked autograd path still refuses it.
    wide = BatchedObjective(observations("lenet-dlg", (3, 32, 32), 1, 1), None, torch.float32)
    small = BatchedObjective(observations("lenet", (3, 32, 32), 1, 1), None, torch.float32)
    assert wide.path == small.path == "explicit"
    assert wide._unfolded is None and small._unfolded == 57_600
