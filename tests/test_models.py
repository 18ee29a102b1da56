"""The papers' models: exact architecture, init, and twice-differentiability."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradleak.errors import ConfigError
from gradleak.models import CifarResNet, LeNet, build_model
from gradleak.threat import observe


@pytest.mark.parametrize(("shape", "hidden"), [((1, 28, 28), 588), ((3, 32, 32), 768)])
def test_lenet_matches_the_idlg_protocol(shape: tuple[int, int, int], hidden: int) -> None:
    model = LeNet(shape, 100, generator=torch.Generator().manual_seed(0))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1)]
    assert all(c.kernel_size == (5, 5) and c.padding == (2, 2) for c in convs)
    assert all(c.out_channels == 12 for c in convs) and convs[0].in_channels == shape[0]
    assert sum(isinstance(m, nn.Sigmoid) for m in model.modules()) == 3
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert (model.fc.in_features, model.fc.out_features) == (hidden, 100)
    assert model(torch.rand(2, *shape)).shape == (2, 100)
    # Every weight and bias uniform in [-0.5, 0.5], filling the range.
    values = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert values.min() >= -0.5 and values.max() <= 0.5
    assert values.min() < -0.49 and values.max() > 0.49
    assert abs(float(values.mean())) < 0.02


def test_seeds_fix_the_weights() -> None:
    a = build_model("lenet", input_shape=(1, 28, 28), num_classes=10, seed=3)
    b = build_model("lenet", input_shape=(1, 28, 28), num_classes=10, seed=3)
    c = build_model("lenet", input_shape=(1, 28, 28), num_classes=10, seed=4)
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_resnet56_is_dlg_style() -> None:
    model = build_model("resnet56", input_shape=(3, 32, 32), num_classes=100, seed=0)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 55  # 1 stem + 27 blocks x 2, plus the final Linear: 56 layers
    assert all(c.stride == (1, 1) for c in model.modules() if isinstance(c, nn.Conv2d))
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert isinstance(model, CifarResNet) and model.fc.out_features == 100


def test_resnet_is_twice_differentiable_with_a_batch_of_one() -> None:
    # Training-mode BatchNorm on one image normalises over its 32x32 positions:
    # the client's gradient exists and the attacker can differentiate it again.
    model = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10, seed=0)
    observation = observe(model, torch.rand(3, 32, 32), torch.tensor(4))
    assert all(torch.isfinite(g).all() for g in observation.gradients)
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([4]))
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    distance = sum(((g - s) ** 2).sum() for g, s in zip(grads, observation.gradients, strict=True))
    (gx,) = torch.autograd.grad(distance, [x])
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0


def test_unknown_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown model 'vgg'"):
        build_model("vgg", input_shape=(3, 32, 32), num_classes=10)
