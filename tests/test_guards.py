"""Inputs an attack must refuse in one line: a negative seed, a gradient that is all zeros."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradleak import DLG, IDLG, build_model, observe
from gradleak.attacks.engine import attack_batch
from gradleak.attacks.text import TextDLG
from gradleak.data import load_dataset
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.experiments.attack import AttackRun
from gradleak.experiments.text.attack import TextAttackRun
from gradleak.models.text import build_text_model, encode, observe_mlm

ZERO = "the shared gradient is all zeros: there is nothing to attack"


def test_runs_refuse_a_negative_seed() -> None:
    with pytest.raises(ConfigError, match="--seed must be 0 or more, got -1"):
        AttackRun(seed=-1)
    with pytest.raises(ConfigError, match="--seed must be 0 or more, got -3"):
        TextAttackRun(seed=-3)


def _one_class_observation() -> object:
    image, _ = load_dataset("sample")[0]
    model = build_model("lenet", input_shape=(1, 28, 28), num_classes=1, seed=0)
    return observe(model, image, torch.tensor(0))


@pytest.mark.parametrize("attack", [IDLG(), DLG(), IDLG(improved=True)], ids=repr)
def test_attacks_refuse_an_all_zero_gradient(attack: IDLG) -> None:
    observation = _one_class_observation()
    assert not any(bool(g.any()) for g in observation.gradients)
    with pytest.raises(AttackNotApplicable, match=f"^{ZERO} \\(.*2 or more classes\\)$"):
        attack(observation, seed=0)


def test_batched_engine_names_the_victim_with_a_zero_gradient() -> None:
    data = load_dataset("sample")
    model = build_model("lenet", input_shape=data.shape, num_classes=data.num_classes, seed=0)
    image, label = data[0]
    good = observe(model, image, torch.tensor(label))
    zero = dataclasses.replace(good, gradients=tuple(torch.zeros_like(g) for g in good.gradients))
    with pytest.raises(AttackNotApplicable, match="gradient of victim 1 is all zeros"):
        attack_batch(IDLG(iterations=2), [good, zero], [0, 1])
    with pytest.raises(AttackNotApplicable, match=ZERO):
        attack_batch(IDLG(iterations=2), [_one_class_observation()], [0])


def test_text_attack_refuses_an_all_zero_gradient() -> None:
    bert = build_text_model(seed=0)
    observation = observe_mlm(bert.model, encode(bert, "the data stays on the device."))
    zero = dataclasses.replace(
        observation, gradients=tuple(torch.zeros_like(g) for g in observation.gradients)
    )
    with pytest.raises(AttackNotApplicable, match=ZERO):
        TextDLG(iterations=2)(zero, frame=bert.frame, seed=0)


def test_cli_one_class_is_one_line_and_exit_2(tmp_path: Path) -> None:
    image = tmp_path / "face.png"
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    env = {**os.environ, "GRADLEAK_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "gradleak.cli", "attack", "--dataset", str(image),
         "--num-classes", "1", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith(f"gradleak: error: {ZERO} (")
    assert not (tmp_path / "out" / "metrics.json").exists()
