"""The decoder/encoder models, the shipped BPE, the client's step and the exact span attack."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from gradleak.attacks.span import SpanAttack, SpanConfig, _Run, span_basis, span_distance
from gradleak.attacks.span_encoder import BertBlockZero, EncoderSearch, SearchLimits
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.models.text_lm import (
    TOKENIZER_FILE,
    LanguageModel,
    LoraSetup,
    bpe_corpus,
    build_language_model,
    encode_batch,
    load_language_model,
    observe_batch,
    train_bpe,
)
from gradleak.types import Observation, UpdateObservation

SENTENCES = (
    "the committee met on tuesday to decide where the new school should be built.",
    "my grandmother keeps her recipes in a blue box above the kitchen sink.",
    "the river rose quickly after three days of heavy rain.",
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gpt2() -> LanguageModel:
    return build_language_model("gpt2-tiny", seed=0)


@pytest.fixture(scope="module")
def llama() -> LanguageModel:
    return build_language_model("llama-tiny", seed=0)


def _recovered(lm: LanguageModel, sentences: tuple[str, ...], **step: object) -> tuple[set, set]:
    batch = encode_batch(lm, list(sentences))
    observation = observe_batch(lm, batch, **step)
    result = SpanAttack()(observation, eos=lm.tokenizer.eos_token_id)
    assert result.applicable, result.reason
    return set(result.sequences), set(batch.sequences())


def test_shipped_bpe_is_what_train_bpe_makes() -> None:
    assert train_bpe(bpe_corpus()).to_str() == TOKENIZER_FILE.read_text(encoding="utf-8")


def test_built_models_are_seeded_and_sized(gpt2: LanguageModel) -> None:
    again = build_language_model("gpt2-tiny", seed=0)
    other = build_language_model("gpt2-tiny", seed=1)
    weight = gpt2.model.transformer.h[0].attn.c_attn.weight
    assert torch.equal(weight, again.model.transformer.h[0].attn.c_attn.weight)
    assert not torch.equal(weight, other.model.transformer.h[0].attn.c_attn.weight)
    assert weight.shape == (64, 192) and gpt2.kind == "decoder"
    bert = build_language_model("bert-tiny", layers=3)
    assert bert.kind == "encoder" and bert.model.config.num_hidden_layers == 3
    assert gpt2.model.get_input_embeddings().weight.shape[0] == len(gpt2.tokenizer)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_block_zero_matches_transformers(name: str) -> None:
    """The attack's incremental block 0 against the model's own hidden states."""
    lm = build_language_model(name, seed=2)
    batch = encode_batch(lm, list(SENTENCES[:2]))
    prefixes, t = batch.ids[:, :5], 5
    tokens = torch.tensor([7, 300, 1000])
    observation = observe_batch(lm, batch)
    run = _Run(SpanConfig(), observation, eos=2)
    with torch.no_grad():
        fast = run._block0_last(prefixes, tokens)  # (P, C, width)
        for p in range(2):
            for c in range(3):
                ids = torch.cat([prefixes[p], tokens[c : c + 1]]).unsqueeze(0)
                states = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
                torch.testing.assert_close(fast[p, c], states[1][0, t], atol=1e-5, rtol=1e-4)


def test_span_distance_against_least_squares() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(5, 32, generator=generator, dtype=torch.float64)
    grad = inputs.T @ torch.randn(5, 48, generator=generator, dtype=torch.float64)
    basis, null, rank = span_basis([grad], rank_tolerance=1e-9)
    assert rank == 5 and basis.shape == (32, 5) and null.shape == (32, 27)
    probes = torch.cat([inputs[:2], torch.randn(3, 32, generator=generator, dtype=torch.float64)])
    coef = torch.linalg.lstsq(inputs.T, probes.T).solution
    slow = (inputs.T @ coef - probes.T).norm(dim=0) / probes.norm(dim=1)
    torch.testing.assert_close(span_distance(probes, null), slow)
    assert (slow[:2] < 1e-10).all() and (slow[2:] > 0.3).all()


def test_gpt2_batch_recovered_exactly(gpt2: LanguageModel) -> None:
    got, truth = _recovered(gpt2, SENTENCES[:2])
    assert got == truth


def test_gpt2_first_block_finds_the_batch_tokens_per_position(gpt2: LanguageModel) -> None:
    batch = encode_batch(gpt2, [SENTENCES[0]])
    result = SpanAttack()(observe_batch(gpt2, batch), eos=gpt2.tokenizer.eos_token_id)
    ids = batch.ids[0].tolist()
    # One token per position, the sentence's own; the last one (</s>) is invisible.
    assert result.candidates == tuple((i,) for i in ids[:-1])
    assert result.sequences == (tuple(ids),)


def test_llama_batch_recovered_exactly(llama: LanguageModel) -> None:
    got, truth = _recovered(llama, SENTENCES[1:3])
    assert got == truth


def test_bert_single_sentence_recovered_exactly() -> None:
    bert = build_language_model("bert-tiny", seed=0)
    got, truth = _recovered(bert, SENTENCES[2:3])
    assert got == truth


def test_lora_adapters_on_qkv_leak_a_short_sentence(llama: LanguageModel) -> None:
    """LLaMA's q/k/v adapters: 3 x r = 24 columns hold one sentence's 15 tokens."""
    got, truth = _recovered(llama, ("the river rose quickly after three days.",), lora=LoraSetup())
    assert got == truth


def test_lora_rank_bounds_the_span(gpt2: LanguageModel) -> None:
    batch = encode_batch(gpt2, [SENTENCES[0]])
    observation = observe_batch(gpt2, batch, lora=LoraSetup(rank=8))
    assert all("lora_" in n for n in observation.parameter_names)
    result = SpanAttack()(observation, eos=gpt2.tokenizer.eos_token_id)
    assert not result.applicable and result.rank == 8 and "span" in result.reason
    wide = observe_batch(gpt2, batch, lora=LoraSetup(rank=40))
    assert SpanAttack()(wide, eos=2).sequences == tuple(batch.sequences())


def test_fresh_lora_adapter_gives_no_gradient(gpt2: LanguageModel) -> None:
    batch = encode_batch(gpt2, [SENTENCES[0]])
    observation = observe_batch(gpt2, batch, lora=LoraSetup(b_std=0.0))
    with pytest.raises(AttackNotApplicable, match="fresh LoRA adapter"):
        SpanAttack()(observation, eos=2)


def test_local_steps_update_recovered(gpt2: LanguageModel) -> None:
    batch = encode_batch(gpt2, list(SENTENCES[:2]))
    update = observe_batch(gpt2, batch, local_steps=3, lr=1e-3)
    assert isinstance(update, UpdateObservation) and update.local_steps == 3
    result = SpanAttack()(update, eos=2)
    assert set(result.sequences) == set(batch.sequences())


def test_full_span_is_said_up_front(gpt2: LanguageModel) -> None:
    batch = encode_batch(gpt2, [s + " " + s for s in SENTENCES])  # ~ 90 distinct inputs > 64
    result = SpanAttack()(observe_batch(gpt2, batch), eos=2)
    assert not result.applicable and result.sequences == ()
    assert "more distinct token inputs" in result.reason


def test_wrong_gradient_recovers_nothing_of_the_batch(gpt2: LanguageModel) -> None:
    """Fails when the attack ignores the gradient: another batch's gradient, other sentences."""
    batch = encode_batch(gpt2, [SENTENCES[0]])
    other = observe_batch(gpt2, encode_batch(gpt2, [SENTENCES[1]]))
    result = SpanAttack()(other, eos=2)
    assert tuple(batch.sequences()[0]) not in result.sequences


def test_observation_without_the_projections_is_refused(gpt2: LanguageModel) -> None:
    observation = observe_batch(gpt2, encode_batch(gpt2, [SENTENCES[0]]))
    assert isinstance(observation, Observation)
    keep = [i for i, n in enumerate(observation.parameter_names) if "h.0.attn" not in n]
    cut = dataclasses.replace(
        observation,
        gradients=tuple(observation.gradients[i] for i in keep),
        parameter_names=tuple(observation.parameter_names[i] for i in keep),
    )
    with pytest.raises(AttackNotApplicable, match="lacks layer 0's attention projections"):
        SpanAttack()(cut, eos=2)


def test_bad_input(gpt2: LanguageModel, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown model 'gpt5'"):
        build_language_model("gpt5")
    with pytest.raises(ConfigError, match="takes at most 128"):
        encode_batch(gpt2, ["word " * 200])
    with pytest.raises(ConfigError, match="sentence 2 is empty"):
        encode_batch(gpt2, ["hello", " "])
    with pytest.raises(ConfigError, match="q_proj do not exist"):
        observe_batch(gpt2, encode_batch(gpt2, ["hi"]), lora=LoraSetup(targets=("q_proj",)))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="holds pytorch_model.bin but no model.safetensors"):
        load_language_model(pickled)


def test_saved_model_loads_and_mismatched_tokenizer_is_refused(
    gpt2: LanguageModel, tmp_path: Path
) -> None:
    folder = tmp_path / "gpt2"
    gpt2.model.save_pretrained(folder)
    gpt2.tokenizer.save_pretrained(folder)
    loaded = load_language_model(folder)
    assert loaded.kind == "decoder" and len(loaded.tokenizer) == len(gpt2.tokenizer)
    got, truth = _recovered(loaded, SENTENCES[:1])
    assert got == truth
    small = build_language_model("gpt2-tiny")
    small.model.resize_token_embeddings(100)
    other = tmp_path / "small"
    small.model.save_pretrained(other)
    gpt2.tokenizer.save_pretrained(other)
    with pytest.raises(ConfigError, match="tokens but the model's vocabulary has 100"):
        load_language_model(other)


def test_second_block_full_is_said_up_front(gpt2: LanguageModel) -> None:
    """Few distinct tokens (the first block copes) but B x length above the width."""
    words = ["red", "blue", "green"]
    draw = torch.randint(3, (6, 12), generator=torch.Generator().manual_seed(0)).tolist()
    sentences = [" ".join(words[w] for w in row) for row in draw]
    result = SpanAttack()(observe_batch(gpt2, encode_batch(gpt2, sentences)), eos=2)
    assert not result.applicable and "second block" in result.reason
    assert result.rank < 44 and len(result.candidates) == 13


def test_grouped_query_llama_recovered(llama: LanguageModel) -> None:
    """LLaMA-class models with fewer key/value heads than query heads (GQA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(llama.tokenizer), hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, intermediate_size=96,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).eval()
    gqa = LanguageModel(model=model, tokenizer=llama.tokenizer, name="gqa")
    got, truth = _recovered(gqa, SENTENCES[1:3])
    assert got == truth


# -- the encoder's combination search (span_encoder.py) ------------------------------------

SHORT = (
    "the river rose quickly.",
    "my cat sleeps all day.",
    "we walked to the harbour.",
    "please call the clinic.",
)


@pytest.fixture(scope="module")
def tiny_bert() -> LanguageModel:
    return build_language_model("bert-tiny", seed=2)


def _search(lm: LanguageModel, sentences: tuple[str, ...]) -> tuple[EncoderSearch, list]:
    batch = encode_batch(lm, list(sentences))
    observation = observe_batch(lm, batch)
    run = _Run(SpanConfig(), observation, eos=2)
    candidates = SpanAttack(search_starts=0)(observation, eos=2).candidates
    _, null2, _ = span_basis(run._projection_matrices(1), rank_tolerance=1e-7)
    block = BertBlockZero(run.base, run._embed)
    search = EncoderSearch(
        block, candidates, null2.float(), threshold=2e-4, eos=2, limits=SearchLimits()
    )
    return search, batch.sequences()


def test_bert_block_zero_matches_transformers() -> None:
    """Block 0 on whole sequences against BertLayer inside the model (padded, masked)."""
    lm = build_language_model("bert-tiny", seed=1)
    double = LanguageModel(model=lm.model.double(), tokenizer=lm.tokenizer, name="double")
    batch = encode_batch(double, list(SHORT[:3]))
    run = _Run(SpanConfig(), observe_batch(double, batch), eos=2)
    block = BertBlockZero(run.base, run._embed)
    with torch.no_grad():
        states = double.model(
            input_ids=batch.ids, attention_mask=batch.mask, output_hidden_states=True
        ).hidden_states[1]
        for row, sequence in enumerate(batch.sequences()):
            mine = block.sequences(torch.tensor([sequence]))[0]
            assert mine.dtype == torch.float64
            torch.testing.assert_close(mine, states[row, : len(sequence)], atol=1e-10, rtol=1e-9)


def test_search_own_distance_against_whole_sequences(tiny_bert: LanguageModel) -> None:
    """The search's one-position fast path against block 0 on each whole sequence."""
    search, _ = _search(tiny_bert, SHORT)
    generator = torch.Generator().manual_seed(0)
    length, t = 7, 3
    rows = torch.stack(
        [
            torch.randint(len(search.candidates[j]), (2,), generator=generator)
            for j in range(length)
        ],
        dim=1,
    )
    choices = torch.arange(len(search.candidates[t]))
    keys, values = search._keys(rows)
    with torch.no_grad():
        fast = search._own(keys, values, t, choices)  # (2, C)
        for r in range(2):
            ids = torch.stack([search.tokens[j][rows[r, j]] for j in range(length)])
            ids = ids.repeat(len(choices), 1)
            ids[:, t] = search.tokens[t]
            slow = span_distance(search.block.sequences(ids)[:, t], search.null2)
            torch.testing.assert_close(fast[r], slow, atol=1e-6, rtol=1e-4)


def test_bert_batch_recovered_exactly(tiny_bert: LanguageModel) -> None:
    got, truth = _recovered(tiny_bert, SHORT)
    assert got == truth


def test_second_block_check_rejects_swapped_tokens(tiny_bert: LanguageModel) -> None:
    """Every batch sequence passes the whole-sequence check; one token swapped fails it."""
    search, truth = _search(tiny_bert, SHORT)
    with torch.no_grad():
        for sequence in truth:
            index = [search.candidates[t].index(tok) for t, tok in enumerate(sequence)]
            assert search._passes(torch.tensor([index])) == [True]
            other = [s for s in truth if len(s) > 2 and s[1] != sequence[1]][0]
            index[1] = search.candidates[1].index(other[1])  # another sentence's first word
            assert search._passes(torch.tensor([index])) == [False]


def test_search_without_the_check_reports_false_sequences(tiny_bert: LanguageModel) -> None:
    """Fails when the check is what keeps false sequences out: switched off, they come."""
    batch = encode_batch(tiny_bert, list(SHORT))
    observation = observe_batch(tiny_bert, batch)
    loose = SpanAttack(search_threshold=1.0)(observation, eos=2)
    assert set(loose.sequences) - set(batch.sequences())
    assert set(SpanAttack()(observation, eos=2).sequences) <= set(batch.sequences())


def test_search_budget_zero_gives_candidates_only(tiny_bert: LanguageModel) -> None:
    batch = encode_batch(tiny_bert, list(SHORT))
    result = SpanAttack(search_starts=0)(observe_batch(tiny_bert, batch), eos=2)
    assert result.applicable and result.sequences == () and result.search_starts == 0
    assert len(result.candidates) == max(len(s) for s in batch.sequences())
    for t, tokens in enumerate(result.candidates):
        assert {s[t] for s in batch.sequences() if len(s) > t} <= set(tokens)
