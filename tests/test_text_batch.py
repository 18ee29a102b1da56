"""`gradleak attack-text` on batches (span, TAG), its scores, and the TAG baseline."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from gradleak.attacks.tag import TagAttack
from gradleak.cli import main
from gradleak.experiments.text.batch import read_sentences, rouge_n, score, token_accuracy
from gradleak.experiments.text.dager import DagerTableRun, run_dager_table
from gradleak.models.text_lm import LanguageModel, build_language_model, encode_batch, observe_batch


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gpt2() -> LanguageModel:
    return build_language_model("gpt2-tiny", seed=0)


def test_rouge_by_hand() -> None:
    assert rouge_n("the cat sat on the mat", "the cat sat on the mat", 1) == 1.0
    # unigrams: reference 6, candidate 3, overlap {the, cat, mat} = 3: P 1, R 0.5
    assert rouge_n("the cat sat on the mat", "the cat mat", 1) == pytest.approx(2 / 3)
    # bigrams: reference 5, candidate 2 ("the cat", "cat mat"), overlap 1: P 0.5, R 0.2
    assert rouge_n("the cat sat on the mat", "the cat mat", 2) == pytest.approx(2 / 7)
    assert rouge_n("a b", "", 1) == 0.0


def test_score_pairs_like_brute_force(gpt2: LanguageModel) -> None:
    truth = [(1, 5, 6, 7, 2), (1, 8, 9, 2), (1, 5, 9, 7, 2)]
    recovered = [(1, 8, 9, 2), (1, 5, 9, 9, 2), (1, 5, 6, 7, 2)]
    assert token_accuracy(truth[2], recovered[1]) == pytest.approx(2 / 3)  # frame left out
    best = max(
        sum(token_accuracy(t, recovered[j]) for t, j in zip(truth, perm, strict=True))
        for perm in itertools.permutations(range(3))
    )
    result = score(gpt2, truth, recovered)
    assert result["token_accuracy"] == pytest.approx(best / 3)
    assert result["exact"] == pytest.approx(2 / 3) and result["recovered_count"] == 3
    assert score(gpt2, truth, [])["exact"] == 0.0


def test_tag_baseline_recovers_a_short_sentence(gpt2: LanguageModel) -> None:
    batch = encode_batch(gpt2, ["the bakery sells fresh bread."])
    observation = observe_batch(gpt2, batch)
    result = TagAttack(iterations=200)(
        observation, lengths=[int(batch.mask.sum())], bos=1, eos=2, decoder=True, seed=0
    )
    assert result.sequences == tuple(batch.sequences())
    assert result.loss_history[-1] < 0.05 * result.loss_history[0]


def test_attack_text_batch_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sentences = tmp_path / "private.txt"
    sentences.write_text("the bank sent me a letter.\n\nmy phone stopped working last summer.\n")
    out = tmp_path / "run"
    args = ["attack-text", "--model", "gpt2-tiny", "--sentences", str(sentences)]
    assert main([*args, "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "100% of 2 sentences exact" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    span = metrics["methods"]["span"]
    assert span["exact"] == 1.0 and span["rouge1"] == 1.0 and metrics["batch_size"] == 2
    assert {s["recovered"] for s in span["sentences"]} == {
        "the bank sent me a letter.",
        "my phone stopped working last summer.",
    }


def test_attack_text_encoder_batch_needs_no_fallback(tmp_path: Path) -> None:
    """An encoder's batch comes back from the combination search, not from TAG."""
    sentences = tmp_path / "private.txt"
    sentences.write_text(
        "the river rose quickly.\nmy cat sleeps all day.\nwe walked to the harbour.\n"
        "please call the clinic.\n"
    )
    out = tmp_path / "run"
    args = ["attack-text", "--model", "bert-tiny", "--sentences", str(sentences), "--seed", "2"]
    assert main([*args, "--out", str(out), "--device", "cpu"]) == 0
    span = json.loads((out / "metrics.json").read_text())["methods"]["span"]
    assert "fallback" not in span and span["applicable"] is True
    assert span["exact"] == 1.0 and span["recovered_count"] == 4 and span["search_starts"] > 0


def test_attack_text_full_span_falls_back_to_tag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["attack-text", "--model", "gpt2-tiny", "--batch-size", "4", "--iterations", "2"]
    assert main([*args, "--out", str(out), "--device", "cpu"]) == 0
    assert "span attack not applicable" in capsys.readouterr().out
    span = json.loads((out / "metrics.json").read_text())["methods"]["span"]
    assert span["applicable"] is False and span["fallback"] == "tag"


def test_shipped_sentences_fit_the_span_of_gpt2_small_at_16(gpt2: LanguageModel) -> None:
    sentences = read_sentences(None, 16)
    batch = encode_batch(gpt2, sentences)
    assert len(sentences) == 16 and int(batch.mask.sum(dim=1).max()) <= 32


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sentences", "absent.txt"], "sentences file 'absent.txt' not found"),
        (["--batch-size", "100"], "--batch-size 100 but the shipped set holds 64"),
        (["--method", "dlg", "--batch-size", "2"], "--method dlg attacks one sentence"),
        (["--method", "fast", "--batch-size", "2"], "unknown method 'fast'"),
        (["--model", "pickled", "--method", "span"], "holds pytorch_model.bin"),
        (["--model", "gpt2-tiny", "word " * 200], "takes at most 128"),
        (["--model", "gpt2-tiny", "--layers", "1"], "--layers must be 2 or more"),
        (["--model", "gpt2-tiny", "--local-lr", "nan"], "--local-lr must be a positive number"),
    ],
)
def test_attack_text_batch_bad_input(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(SystemExit) as stopped:
        main(["attack-text", *args, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith("gradleak: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_dager_table_runs_and_resumes(tmp_path: Path) -> None:
    run = DagerTableRun(
        models=("gpt2-tiny", "llama-tiny"), batch_sizes=(1, 2), methods=("span",),
        device="cpu", out=str(tmp_path), workers=1,
    )  # fmt: skip
    summary = run_dager_table(run)
    assert [(r["model"], r["batch_size"]) for r in summary["rows"]] == [
        ("gpt2-tiny", 1), ("gpt2-tiny", 2), ("llama-tiny", 1), ("llama-tiny", 2),
    ]  # fmt: skip
    assert all(r["exact"] == 1.0 and r["rouge2"] == 1.0 for r in summary["rows"])
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert (
        "| gpt2-tiny | 64 x 2 | 2 | span | 100% | 100.0 | 100.0 |"
        in (tmp_path / "report.md").read_text()
    )
    again = run_dager_table(run)  # resumed: nothing recomputed, same rows
    assert (tmp_path / "results.jsonl").read_text().splitlines() == lines
    assert again["rows"] == summary["rows"]
