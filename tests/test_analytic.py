"""The closed-form warm start: exact on iDLG's LeNet, None where it does not apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradleak import DLG, IDLG, build_model, observe
from gradleak.attacks import analytic
from gradleak.attacks.analytic import ClosedFormCache, analytic_inputs, sigmoid_conv_chain
from gradleak.attacks.engine import attack_batch
from gradleak.data import load_dataset
from gradleak.metrics import mse


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def victims(dataset: str, count: int, seed: int = 7) -> tuple[list, list[torch.Tensor]]:
    data = load_dataset(dataset)
    observations, images = [], []
    for i in range(count):
        image, label = data[i]
        model = build_model(
            "lenet", input_shape=data.shape, num_classes=data.num_classes, seed=seed + i
        )
        observations.append(observe(model, image, torch.tensor(label)))
        images.append(image)
    return observations, images


def test_lenet_input_comes_back_before_any_matching_step() -> None:
    observations, images = victims("sample", 4)
    labels = torch.tensor([int(o.gradients[-1].argmin()) for o in observations])
    estimates = analytic_inputs(observations, labels)
    assert estimates is not None
    for estimate, image in zip(estimates, images, strict=True):
        assert mse(estimate.float(), image) < 1e-6


def test_the_label_is_read_when_not_given() -> None:
    observations, images = victims("sample", 2)
    estimates = analytic_inputs(observations, None)
    assert estimates is not None
    assert all(mse(e.float(), x) < 1e-6 for e, x in zip(estimates, images, strict=True))


def test_cifar_start_is_close_and_the_attack_finishes_it() -> None:
    observations, images = victims("sample-cifar100", 3)
    estimates = analytic_inputs(observations, None)
    assert estimates is not None
    assert all(mse(e.float(), x) < 1e-2 for e, x in zip(estimates, images, strict=True))
    results = attack_batch(IDLG(improved=True), observations, [0, 1, 2])
    for result, image in zip(results, images, strict=True):
        assert result.converged
        assert mse(result.inputs, image) < 1e-6
        assert result.evaluations < 200  # from noise it takes about 2,000


def test_no_closed_form_for_other_architectures_or_batches() -> None:
    data = load_dataset("sample-cifar100")
    image, label = data[0]
    resnet = build_model("resnet20", input_shape=data.shape, num_classes=100, seed=0)
    assert sigmoid_conv_chain(observe(resnet, image, torch.tensor(label))) is None
    lenet = build_model("lenet", input_shape=data.shape, num_classes=100, seed=0)
    images = torch.stack([data[0][0], data[1][0]])
    batch = observe(lenet, images, torch.tensor([data.label(0), data.label(1)]))
    assert analytic_inputs([batch], None) is None


def test_both_methods_share_one_closed_form_start(monkeypatch: pytest.MonkeyPatch) -> None:
    # DLG's closed form reads the label from the bias gradient, iDLG's rule from
    # the weight gradient: the same label, so one computation serves both.
    observations, images = victims("sample", 3)
    calls: list[int] = []

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return analytic_inputs(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(analytic, "analytic_inputs", counting)
    cache = ClosedFormCache()
    attacks = (DLG(improved=True), IDLG(improved=True))
    shared = [attack_batch(a, observations, [0, 1, 2], closed_form=cache) for a in attacks]
    assert len(calls) == 1
    for attack, results in zip(attacks, shared, strict=True):
        alone = attack_batch(attack, observations, [0, 1, 2])
        assert len(calls) == 2 + (attack is attacks[1])  # each lone run computes its own
        for a, b, image in zip(results, alone, images, strict=True):
            assert torch.equal(a.labels, b.labels)
            assert mse(a.inputs, image) < 1e-6 and mse(b.inputs, image) < 1e-6


def test_weighted_cgls_is_the_dense_weighted_least_squares(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A small layer, solved the slow and obviously correct way: the operator as a
    # dense matrix (its columns are the images of the unit inputs), each forward
    # row times its trust, and torch's least squares.
    monkeypatch.setattr(analytic, "_CGLS_FLOOR", 1e-28)
    g = torch.Generator().manual_seed(3)
    conv = analytic._Conv("w", None, (1, 1), (1, 1), (2, 6, 6))
    weight = torch.randn(1, 3, 2, 3, 3, generator=g, dtype=torch.float64)
    delta = torch.randn(1, 3, 6, 6, generator=g, dtype=torch.float64)
    target = torch.randn(1, 3, 6, 6, generator=g, dtype=torch.float64)
    trust = torch.rand(1, 3, 6, 6, generator=g, dtype=torch.float64) * 0.99 + 0.01
    gradient = torch.randn(1, 3, 2, 3, 3, generator=g, dtype=torch.float64)
    solved = analytic._solve_layer(conv, weight, delta, target, trust, gradient, 2000)[0]

    scale = 1 / delta.abs().max()
    units = torch.eye(72, dtype=torch.float64).reshape(72, 1, 2, 6, 6)
    forward = torch.stack([torch.nn.functional.conv2d(u, weight[0], padding=1).flatten()
                           for u in units], 1)  # fmt: skip
    corr = torch.stack([torch.nn.functional.grad.conv2d_weight(u, weight[0].shape, delta,
                        padding=1).flatten() for u in units], 1)  # fmt: skip
    rows = trust.flatten()[:, None]
    dense = torch.cat([rows * forward, scale * corr])
    rhs = torch.cat([rows[:, 0] * target.flatten(), scale * gradient.flatten()])
    expected = torch.linalg.lstsq(dense, rhs[:, None]).solution.reshape(2, 6, 6)
    assert torch.allclose(solved, expected, atol=1e-9, rtol=0)
    unweighted = torch.cat([forward, scale * corr])
    plain = torch.linalg.lstsq(
        unweighted, torch.cat([target.flatten(), scale * gradient.flatten()])[:, None]
    )
    assert (plain.solution.reshape(2, 6, 6) - expected).abs().max() > 1e-3  # the weights matter


@pytest.mark.parametrize("experiment", [187, 909])
def test_a_saturated_activation_does_not_spoil_the_start(data_root: Path, experiment: int) -> None:
    # In these two victims of `reproduce idlg --dataset lfw` a sigmoid of the third
    # conv layer is 1.0 in the client's float32; its logit was the largest error of
    # the unweighted solve, which then landed at MSE 1.9e-1 and 1.8e-2.
    from gradleak.experiments.common import cached_dataset
    from gradleak.experiments.reproduce_idlg.protocol import make_victim

    data = cached_dataset("lfw", data_root)
    victim = make_victim(data, "lfw", 0, experiment, torch.device("cpu"))
    estimate = analytic_inputs([victim.observation], None)
    assert estimate is not None
    assert mse(estimate[0].float(), victim.image.reshape(estimate.shape[1:])) < 1e-4


@pytest.mark.parametrize("experiment", [40, 195])
def test_an_ill_conditioned_exact_solve_hands_the_layer_to_cgls(
    data_root: Path, experiment: int
) -> None:
    # In these victims of `reproduce idlg --dataset lfw --seed 1` the second conv
    # layer's weight gradient alone fixed its input, but through a system that
    # turned the float32 gradient's rounding into an input 1e-3 off: the start
    # landed at MSE 9.9e-6 and 2.6e-5 (against ~1e-9 on most victims) and L-BFGS
    # took 135 and 343 evaluations to finish it.  The forward-residual check
    # sends that layer to CGLS instead.
    from gradleak.experiments.common import cached_dataset
    from gradleak.experiments.reproduce_idlg.protocol import make_victim

    data = cached_dataset("lfw", data_root)
    victim = make_victim(data, "lfw", 1, experiment, torch.device("cpu"))
    estimate = analytic_inputs([victim.observation], torch.tensor([victim.label]))
    assert estimate is not None
    assert mse(estimate[0].float(), victim.image.reshape(estimate.shape[1:])) < 1e-6
