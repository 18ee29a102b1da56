"""Faithful mode is the published iDLG loop, bit for bit, on the sequential engine.

`published_loop` is our transcription of the loop of the iDLG authors' code,
written from its description (shared/PAPERS.md and issue 14): one L-BFGS step
(lr 1, no line search), then the matching loss evaluated again at the point
the step reached, compared with the tolerance at iterations 0, 10, 20, ...;
DLG's soft label through ``log(softmax(.))``; the gradient left in ``.grad``
by ``backward``.  The attacks must give the same loss after every step, the
same final dummy and the same label, to the last bit, from the same start.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradleak import DLG, IDLG, build_model, observe
from gradleak.attacks import AttackConfig
from gradleak.data import load_dataset
from gradleak.errors import ConfigError
from gradleak.types import Observation


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def published_loop(
    observation: Observation,
    method: str,
    x0: torch.Tensor,
    logits0: torch.Tensor,
    *,
    iterations: int,
    tolerance: float = 1e-6,
    check_every: int = 10,
) -> tuple[list[float], torch.Tensor, int]:
    """The published loop; returns the losses, the final dummy and its label."""
    net = copy.deepcopy(observation.model)
    dy_dx = [g.detach().clone() for g in observation.gradients]
    criterion = nn.CrossEntropyLoss()
    dummy_data = x0.clone().requires_grad_(True)
    dummy_label = logits0.clone().requires_grad_(True)
    if method == "dlg":
        optimizer = torch.optim.LBFGS([dummy_data, dummy_label], lr=1)
    else:
        optimizer = torch.optim.LBFGS([dummy_data], lr=1)
        label_pred = torch.argmin(torch.sum(dy_dx[-2], dim=-1), dim=-1).detach().reshape((1,))
    losses: list[float] = []
    for iters in range(iterations):

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            pred = net(dummy_data)
            if method == "dlg":
                dummy_loss = -torch.mean(
                    torch.sum(
                        torch.softmax(dummy_label, -1) * torch.log(torch.softmax(pred, -1)), dim=-1
                    )
                )
            else:
                dummy_loss = criterion(pred, label_pred)
            dummy_dy_dx = torch.autograd.grad(dummy_loss, net.parameters(), create_graph=True)
            grad_diff = 0
            for gx, gy in zip(dummy_dy_dx, dy_dx, strict=True):
                grad_diff += ((gx - gy) ** 2).sum()
            grad_diff.backward()  # type: ignore[union-attr]
            return grad_diff  # type: ignore[return-value]

        optimizer.step(closure)
        current_loss = closure().item()
        losses.append(current_loss)
        if iters % check_every == 0 and current_loss < tolerance:
            break
    if method == "dlg":
        label = int(torch.argmax(dummy_label, dim=-1).item())
    else:
        label = int(label_pred.item())
    return losses, dummy_data.detach(), label


def victim(index: int, dataset: str = "sample") -> Observation:
    data = load_dataset(dataset)
    image, label = data[index]
    model = build_model(
        "lenet", input_shape=data.shape, num_classes=data.num_classes, seed=300 + index
    )
    return observe(model, image, torch.tensor(label))


def seeded_start(observation: Observation, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The faithful attack's own draws for `seed`: inputs, then label logits."""
    generator = torch.Generator().manual_seed(seed)
    x0 = AttackConfig().initial_inputs((1, *observation.input_shape), generator)
    return x0, torch.randn((1, observation.num_classes), generator=generator)


def same_history(ours: tuple[float, ...], theirs: list[float]) -> bool:
    """Equal to the bit, NaN equal to NaN."""
    return len(ours) == len(theirs) and all(
        a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(ours, theirs, strict=True)
    )


@pytest.mark.parametrize("method", ["idlg", "dlg"])
@pytest.mark.parametrize("index", [0, 3])
def test_faithful_attack_is_the_published_loop_bit_for_bit(method: str, index: int) -> None:
    # A tolerance of 1e-2 makes the check at iterations 0, 10, 20 decide in
    # 30 steps, where 1e-6 would take hundreds: the stopping rule is what
    # differs from checking the loss a step returns (the one before it).
    observation = victim(index)
    x0, logits0 = seeded_start(observation, seed=index)
    losses, final, label = published_loop(
        observation, method, x0, logits0, iterations=30, tolerance=1e-2
    )
    attack = (DLG if method == "dlg" else IDLG)(iterations=30, tolerance=1e-2)
    start_labels = logits0 if method == "dlg" else None
    steps: list[tuple[int, float]] = []
    result = attack(
        observation,
        seed=12345,  # the start is given: the seed's draws are not used
        start=x0,
        start_labels=start_labels,
        callback=lambda k, loss: steps.append((k, loss)),
    )
    assert same_history(result.loss_history, losses)
    assert steps == list(enumerate(losses))
    assert result.steps == len(losses)
    assert torch.equal(result.inputs, final)
    assert int(result.labels[0]) == label
    assert result.converged == (losses[-1] < 1e-2)
    # Each step's first evaluation is the previous step's last: nothing is computed twice.
    assert result.evaluations <= 20 * len(losses) + 1


def test_a_run_that_stops_early_ends_where_the_published_loop_checked() -> None:
    # With 1e-6, victim 4's iDLG run stops at a check after step 0 mod 10, at
    # the point that step reached (x1, x11, ...), not one step earlier.
    observation = victim(4)
    x0, logits0 = seeded_start(observation, seed=0)
    losses, final, _ = published_loop(observation, "idlg", x0, logits0, iterations=300)
    result = IDLG()(observation, seed=0)  # the seeded draw is x0
    assert len(losses) < 300 and (len(losses) - 1) % 10 == 0 and losses[-1] < 1e-6
    assert same_history(result.loss_history, losses)
    assert torch.equal(result.inputs, final) and result.converged


def test_a_point_gone_nan_ends_with_what_the_remaining_steps_would_give() -> None:
    observation = victim(1)
    x0 = torch.full((1, *observation.input_shape), math.nan)
    logits0 = torch.zeros(1, observation.num_classes)
    losses, final, label = published_loop(observation, "dlg", x0, logits0, iterations=25)
    result = DLG(iterations=25)(observation, start=x0, start_labels=logits0)
    assert len(losses) == 25 and all(math.isnan(v) for v in losses)
    assert same_history(result.loss_history, losses)
    assert result.steps == 25 and not result.converged
    assert bool(torch.isnan(result.inputs).all()) and bool(torch.isnan(final).all())
    assert int(result.labels[0]) == label
    assert result.evaluations < 20 * 25  # the NaN steps were not all computed


def test_a_given_start_equal_to_the_seeded_draw_replays_the_seeded_run() -> None:
    observation = victim(2)
    x0, logits0 = seeded_start(observation, seed=7)
    seeded = DLG(iterations=12)(observation, seed=7)
    replayed = DLG(iterations=12)(observation, seed=7, start=x0, start_labels=logits0)
    assert seeded.loss_history == replayed.loss_history
    assert torch.equal(seeded.inputs, replayed.inputs)
    other = DLG(iterations=12)(observation, seed=7, start=x0 + 0.1, start_labels=logits0)
    assert other.loss_history != seeded.loss_history


def test_a_start_of_the_wrong_shape_or_for_the_wrong_attack_is_refused() -> None:
    observation = victim(0)
    with pytest.raises(ConfigError, match="start must have shape"):
        IDLG()(observation, start=torch.zeros(1, 28, 28))
    with pytest.raises(ConfigError, match="takes no start_labels"):
        IDLG()(observation, start_labels=torch.zeros(1, 10))
    with pytest.raises(ConfigError, match="start_labels must have shape"):
        DLG()(observation, start_labels=torch.zeros(10))


def test_a_start_in_improved_mode_replaces_the_closed_form_start() -> None:
    observation = victim(0)
    start = torch.full((1, *observation.input_shape), 0.5, dtype=torch.float64)
    result = IDLG(improved=True, iterations=3)(observation, start=start)
    warm = IDLG(improved=True, iterations=3)(observation)
    assert result.loss_history[0] > 100 * warm.loss_history[0]
    assert result.snapshots[0].inputs.eq(0.5).all()
