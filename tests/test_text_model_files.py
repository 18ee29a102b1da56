"""`attack-text --model DIR` on damaged or unsafe folders: one clear line, exit 2, no unpickling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gradleak.errors import ConfigError
from gradleak.models.text import TextModelConfig, build_text_model, load_text_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small built-in BERT and its tokenizer, saved with save_pretrained."""
    text_model = build_text_model(TextModelConfig(layers=1), seed=0)
    folder = tmp_path_factory.mktemp("saved-bert")
    text_model.model.save_pretrained(folder)
    text_model.tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


def _cut_off(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _pickle_only(folder: Path) -> None:
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()


def _unknown_type(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "frobnet"}))


def _not_masked(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))


DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "cut-off weights": (_cut_off, "model.safetensors' is cut off or corrupt"),
    "pickle only": (
        _pickle_only,
        "holds pytorch_model.bin but no model.safetensors: gradleak loads only safetensors",
    ),
    "unknown model_type": (_unknown_type, "has model_type 'frobnet', which transformers"),
    "not a masked LM": (_not_masked, "holds a 'gpt2' model, which is not a masked language"),
}


def _damaged(saved: Path, tmp_path: Path, case: str) -> tuple[Path, str]:
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    damage, message = DAMAGES[case]
    damage(folder)
    return folder, message


def test_the_saved_folder_loads(saved: Path) -> None:
    assert load_text_model(saved).model.config.num_hidden_layers == 1


@pytest.mark.parametrize("case", list(DAMAGES))
def test_damaged_folder_is_refused_in_one_line(saved: Path, tmp_path: Path, case: str) -> None:
    folder, message = _damaged(saved, tmp_path, case)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_text_model(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "gradleak.cli", "attack-text", "hello world", "--model",
         str(folder), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1 and lines[0].startswith("gradleak: error: ") and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_pickle_is_never_loaded(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, _ = _damaged(saved, tmp_path, "pickle only")

    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load was called on a pickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ConfigError, match=r"save_pretrained\(folder, safe_serialization=True\)"):
        load_text_model(folder)
