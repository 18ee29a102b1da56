"""The library's attacks run on one CPU thread, as the CLI does, unless the user chose."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from gradleak import IDLG, build_model, observe
from gradleak.attacks.engine import attack_batch
from gradleak.attacks.text import TextDLG
from gradleak.attacks.threads import attack_threads
from gradleak.data import load_dataset
from gradleak.models.text import build_text_model, encode, observe_mlm


@pytest.fixture(autouse=True)
def _two_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Start every test at two threads with OMP_NUM_THREADS unset; restore the count after."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _observation() -> object:
    data = load_dataset("sample")
    image, label = data[0]
    model = build_model("lenet", input_shape=data.shape, num_classes=data.num_classes, seed=0)
    return observe(model, image, torch.tensor(label))


def test_sequential_attack_runs_on_one_thread_and_restores_the_count() -> None:
    seen: list[int] = []
    IDLG(iterations=3)(
        _observation(), seed=0, callback=lambda *_: seen.append(torch.get_num_threads())
    )
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2


def test_batched_engine_runs_on_one_thread() -> None:
    seen: list[int] = []
    attack_batch(
        IDLG(iterations=3),
        [_observation()],
        [0],
        on_result=lambda *_: seen.append(torch.get_num_threads()),
    )
    assert seen == [1] and torch.get_num_threads() == 2


def test_text_attack_runs_on_one_thread() -> None:
    bert = build_text_model(seed=0)
    observation = observe_mlm(bert.model, encode(bert, "the data stays on the device."))
    seen: list[int] = []
    TextDLG(iterations=2)(
        observation,
        frame=bert.frame,
        seed=0,
        callback=lambda *_: seen.append(torch.get_num_threads()),
    )
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2


def test_omp_num_threads_is_the_users_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    seen: list[int] = []
    IDLG(iterations=2)(
        _observation(), seed=0, callback=lambda *_: seen.append(torch.get_num_threads())
    )
    assert seen and set(seen) == {2}


def test_gpu_attacks_leave_the_count_alone() -> None:
    with attack_threads(torch.device("cuda")):
        assert torch.get_num_threads() == 2
    with attack_threads("cpu"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_the_count_is_restored_when_the_attack_fails() -> None:
    with pytest.raises(RuntimeError), attack_threads("cpu"):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
