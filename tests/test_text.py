"""DLG on text: the leak, the attack on a small BERT, and `gradleak attack-text`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradleak.attacks.text import TextAttackConfig, TextDLG, leaked_tokens, sequence_length
from gradleak.cli import main
from gradleak.errors import ConfigError
from gradleak.experiments.text.reproduce import TextReproduceRun, run_reproduce_text
from gradleak.models.text import (
    TextModel,
    build_text_model,
    builtin_tokenizer,
    encode,
    load_text_model,
    observe_mlm,
)

SHORT = (
    "the conference will be held in december.",
    "a small model can learn a lot from a few words.",
    "we thank the reviewers for their careful reading of the paper.",
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bert() -> TextModel:
    return build_text_model(seed=0)


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BERT whose output layer shares the word embeddings, saved with its tokenizer."""
    from transformers import BertConfig, BertForMaskedLM

    tokenizer = builtin_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=24, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = BertForMaskedLM(config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    folder = tmp_path_factory.mktemp("tied-bert")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("sentence", SHORT)
def test_short_sentences_recovered_token_for_token(bert: TextModel, sentence: str) -> None:
    ids = encode(bert, sentence)
    result = TextDLG()(observe_mlm(bert.model, ids), frame=bert.frame, seed=0)
    assert result.token_ids.tolist() == ids.tolist()
    assert result.converged and result.matching_loss < 1e-6
    assert bert.decode(result.token_ids[1:-1]) == sentence
    assert result.trace[0][0] == 0 and result.trace[-1] == (result.steps, tuple(ids.tolist()))


def test_gradient_shows_length_and_tokens(bert: TextModel) -> None:
    ids = encode(bert, "the data on the device, but the gradient can leak it.")
    observation = observe_mlm(bert.model, ids)
    assert sequence_length(observation) == len(ids)
    found, how = leaked_tokens(observation, exclude=bert.frame)
    # Brute force: the set of tokens in the sentence, repeats once, frame left out.
    assert how == "embedding rows" and sorted(found) == sorted(set(ids[1:-1].tolist()))


def test_tied_model_from_disk_leaks_through_output_bias(tied_folder: Path) -> None:
    text_model = load_text_model(tied_folder)
    ids = encode(text_model, "please submit your paper before the deadline!")
    observation = observe_mlm(text_model.model, ids)
    found, how = leaked_tokens(observation, exclude=text_model.frame)
    assert how == "output bias" and sorted(found) == sorted(set(ids[1:-1].tolist()))
    result = TextDLG()(observation, frame=text_model.frame, seed=1)
    assert result.token_ids.tolist() == ids.tolist()


def test_faithful_mode_stays_inside_the_leaked_tokens(bert: TextModel) -> None:
    ids = encode(bert, SHORT[0])
    attack = TextDLG(mode="faithful", iterations=3)
    result = attack(observe_mlm(bert.model, ids), frame=bert.frame, seed=0)
    assert result.steps == 3 and len(result.loss_history) == 3
    assert set(result.token_ids[1:-1].tolist()) <= set(ids[1:-1].tolist())
    assert result.token_ids[0] == ids[0] and result.token_ids[-1] == ids[-1]


def test_same_seed_same_result(bert: TextModel) -> None:
    observation = observe_mlm(bert.model, encode(bert, SHORT[1]))
    attack = TextDLG(TextAttackConfig(mode="faithful", iterations=2))
    first, second = (attack(observation, frame=bert.frame, seed=3) for _ in range(2))
    assert first.loss_history == second.loss_history and first.trace == second.trace


def test_bad_sentences_and_configs(bert: TextModel) -> None:
    with pytest.raises(ConfigError, match="empty"):
        encode(bert, "  \n")
    with pytest.raises(ConfigError, match="takes at most 64"):
        encode(bert, "word " * 70)
    with pytest.raises(ConfigError, match="unknown mode 'fast'"):
        TextAttackConfig(mode="fast")


def test_attack_text_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["attack-text", "--out", str(out), "--device", "cpu"]) == 0
    assert "exact" in capsys.readouterr().out
    row = json.loads((out / "metrics.json").read_text())
    assert row["token_accuracy"] == 1.0 and row["exact"] is True
    assert row["recovered_tokens"] == row["tokens"] and row["tokens"][:2] == [
        "federated",
        "learning",
    ]
    trace = (out / "trace.txt").read_text().splitlines()
    assert trace[2].startswith("iter   0 |") and trace[-1] == f"original | {row['original']}"
    assert trace[-2].endswith(f"| {row['original']}")  # the last traced step is the sentence


def _gradleak(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "gradleak.cli", *args],
        capture_output=True, text=True, env=env, timeout=300, cwd=cwd,
    )  # fmt: skip


def test_attack_text_cli_on_a_model_folder(tmp_path: Path, tied_folder: Path) -> None:
    sentence = "authors of accepted papers will present a poster."
    done = _gradleak("attack-text", sentence, "--model", str(tied_folder), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    row = json.loads((tmp_path / "runs" / "attack-text" / "metrics.json").read_text())
    assert row["exact"] and row["recovered"] == sentence and row["leak"] == "output bias"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["   "], "the sentence is empty"),
        (["hello", "--model", "absent"], "model folder 'absent' not found"),
        (["hello", "--seed", "-1"], "--seed: must be 0 or more"),
    ],
)
def test_attack_text_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    done = _gradleak("attack-text", *args, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("gradleak: error: ") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["hello", "--model", "."], "holds no config.json"),
        (["word " * 70], "takes at most 64"),
        (["hello", "--mode", "fast"], "unknown mode 'fast'"),
    ],
)
def test_attack_text_bad_input_in_process(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # "." is then a folder without a model
    with pytest.raises(SystemExit) as stopped:
        main(["attack-text", *args, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith("gradleak: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_reproduce_text_writes_the_figure(tmp_path: Path) -> None:
    run = TextReproduceRun(sentences=SHORT[:2], device="cpu", out=str(tmp_path))
    summary = run_reproduce_text(run)
    assert summary["modes"]["improved"]["exact"] == 1.0
    report = (tmp_path / "report.md").read_text()
    assert "The paper's figure" in report and f"| original | {SHORT[1]} |" in report
    assert (tmp_path / "trace-improved-1.txt").exists()
