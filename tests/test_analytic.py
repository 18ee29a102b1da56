"""The closed-form warm start: exact on iDLG's LeNet, None where it does not apply."""

from __future__ import annotations

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
