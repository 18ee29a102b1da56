"""Language models people fine-tune, the shipped subword tokenizer, and the client's step.

Built-in models are GPT-2-, LLaMA- and BERT-shaped ``transformers`` models
built from a config with a seeded random init (normal, std 0.02; norms at 1
and biases at 0): nothing is downloaded.  They share one byte-level BPE
tokenizer shipped with the package (`text_bpe.json`, 4,096 tokens, trained by
`train_bpe` on the package's word list and sentences; `text_bpe.json` is
retrained bit for bit by that function).  Any folder written by
``save_pretrained`` with safetensors weights can be used instead
(`load_language_model`).

Every sequence is framed ``<s> ... </s>``, padded on the right with
``<pad>`` (masked in attention, left out of the loss).  The client's step
(`observe_batch`): next-token prediction for decoders; for encoders the
token-wise masked-LM setting of DLG (every word predicts itself, no token is
replaced by ``<mask>``).  Full fine-tuning, or LoRA adapters (``peft``) on the
attention projections; one FedSGD step (an `Observation`) or several local SGD
steps (an `UpdateObservation`, FedAvg).  Dropout is off: the server replays
the step and cannot know the client's dropout masks.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.errors import ConfigError
from gradleak.models.text import UNSAFE_SUFFIXES, _check_safetensors, _safetensors_files
from gradleak.types import Observation, UpdateObservation

TOKENIZER_FILE = Path(__file__).with_name("text_bpe.json")
WORDS_FILE = Path(__file__).with_name("text_vocab.txt")
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<mask>")
BPE_VOCAB = 4096

# Projections that LoRA adapts, per family: the attention's query, key and value.
LORA_TARGETS = {
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "k_proj", "v_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj"),
    "bert": ("query", "key", "value"),
}
DECODERS = ("gpt2", "llama", "mistral", "qwen2")
ENCODERS = ("bert",)


@dataclass(frozen=True)
class LMShape:
    """Shape of a built-in model.  `family` is the transformers ``model_type``."""

    family: str
    width: int
    layers: int
    heads: int
    context: int = 128

    @property
    def intermediate(self) -> int:
        return 4 * self.width if self.family != "llama" else (8 * self.width) // 3


BUILTIN = {
    "gpt2-tiny": LMShape("gpt2", 64, 2, 2),
    "gpt2-small": LMShape("gpt2", 768, 12, 12, 1024),
    "llama-tiny": LMShape("llama", 64, 2, 2),
    "llama-small": LMShape("llama", 768, 12, 12, 1024),
    "bert-tiny": LMShape("bert", 64, 2, 2),
    "bert-base": LMShape("bert", 768, 12, 12, 512),
}


@dataclass(frozen=True)
class LanguageModel:
    """A decoder or encoder with its tokenizer and a name for reports."""

    model: nn.Module
    tokenizer: object  # a transformers tokenizer
    name: str

    @property
    def family(self) -> str:
        return str(self.model.config.model_type)

    @property
    def kind(self) -> str:
        """Decoder (next-token prediction) or encoder (masked LM)."""
        return "decoder" if self.family in DECODERS else "encoder"

    @property
    def max_length(self) -> int:
        config = self.model.config
        return int(getattr(config, "n_positions", None) or config.max_position_embeddings)

    def decode(self, ids: list[int] | tuple[int, ...] | torch.Tensor) -> str:
        return str(self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True))


@dataclass(frozen=True)
class Batch:
    """A client's batch: ids ``(B, T)`` right-padded, and the mask of real tokens."""

    ids: torch.Tensor
    mask: torch.Tensor

    def sequences(self) -> list[tuple[int, ...]]:
        """Each sequence's ids without its padding, frame included."""
        return [tuple(row[m].tolist()) for row, m in zip(self.ids, self.mask.bool(), strict=True)]


def train_bpe(texts: list[str], vocab_size: int = BPE_VOCAB) -> object:
    """A byte-level BPE (GPT-2's scheme) trained on `texts`: a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return tokenizer


def bpe_corpus() -> list[str]:
    """What the shipped BPE was trained on: the package's word list and sentences."""
    words = [w for w in WORDS_FILE.read_text(encoding="utf-8").split("\n") if w.isalpha()]
    sentences = Path(__file__).parent.parent / "experiments" / "text" / "sentences.txt"
    return [" ".join(words)] + sentences.read_text(encoding="utf-8").splitlines()


def builtin_bpe() -> object:
    """The shipped BPE as a transformers tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer.from_file(str(TOKENIZER_FILE))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        mask_token="<mask>", cls_token="<s>", sep_token="</s>",
    )  # fmt: skip


def build_language_model(name: str, *, seed: int = 0, layers: int | None = None) -> LanguageModel:
    """A built-in model (`BUILTIN`) with a seeded init; `layers` overrides its depth."""
    if name not in BUILTIN:
        raise ConfigError(f"unknown model '{name}': choose one of {', '.join(BUILTIN)}")
    shape = BUILTIN[name]
    if layers is not None:
        if layers < 2:
            raise ConfigError("--layers must be 2 or more (the span attack reads two layers)")
        shape = LMShape(shape.family, shape.width, layers, shape.heads, shape.context)
    tokenizer = builtin_bpe()
    common = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if shape.family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_embd=shape.width, n_layer=shape.layers, n_head=shape.heads,
            n_positions=shape.context, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **common,
        )  # fmt: skip
        model_class = GPT2LMHeadModel
    elif shape.family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=shape.width, num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
            intermediate_size=shape.intermediate, max_position_embeddings=shape.context,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **common,
        )  # fmt: skip
        model_class = LlamaForCausalLM
    else:
        from transformers import BertConfig, BertForMaskedLM

        config = BertConfig(
            hidden_size=shape.width, num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
            max_position_embeddings=shape.context, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, **common,
        )  # fmt: skip
        model_class = BertForMaskedLM
    config._attn_implementation = "eager"  # twice differentiable (the TAG baseline needs it)
    model = model_class(config)
    _seeded_init_(model, generator=torch.Generator().manual_seed(seed))
    return LanguageModel(model=model.eval(), tokenizer=tokenizer, name=name)


def load_language_model(path: str | Path) -> LanguageModel:
    """A decoder or encoder and its tokenizer from a ``save_pretrained`` folder (safetensors).

    Raises:
        ConfigError: No folder, pickled weights only, a model type gradleak's
            attacks do not know, or a tokenizer larger than the model's vocabulary.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"model folder '{path}' not found: give a folder from save_pretrained")
    weights = _safetensors_files(folder, path)
    if not weights:
        unsafe = sorted(p.name for p in folder.iterdir() if p.name.endswith(UNSAFE_SUFFIXES))
        what = f"holds {unsafe[0]} but no model.safetensors" if unsafe else "holds no weights"
        raise ConfigError(
            f"'{path}' {what}: gradleak loads only safetensors weights (unpickling can run "
            "code); save the model with save_pretrained(folder, safe_serialization=True)"
        )
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        family = str(config["model_type"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"'{path}' holds no readable config.json with a model_type") from None
    if family not in DECODERS + ENCODERS:
        raise ConfigError(
            f"'{path}' holds a '{family}' model: give one of {', '.join(DECODERS + ENCODERS)}"
        )
    for file in weights:
        _check_safetensors(file)
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    auto = AutoModelForCausalLM if family in DECODERS else AutoModelForMaskedLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = auto.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, attn_implementation="eager"
        )
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"could not load a model and tokenizer from '{path}': {reason}") from None
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ConfigError(
            f"the tokenizer in '{path}' has {len(tokenizer)} tokens but the model's vocabulary "
            f"has {vocab}: save the tokenizer the model was trained with beside it"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
    return LanguageModel(model=model.eval(), tokenizer=tokenizer, name=str(folder))


def encode_batch(lm: LanguageModel, sentences: list[str]) -> Batch:
    """Tokenise the client's sentences, framed and right-padded.

    Raises:
        ConfigError: No sentence, an empty one, or one longer than the model's context.
    """
    if not sentences:
        raise ConfigError("no sentences: give at least one private sentence")
    rows = []
    for number, sentence in enumerate(sentences, start=1):
        if not sentence.strip():
            raise ConfigError(f"sentence {number} is empty: give a few words on each line")
        ids = lm.tokenizer(sentence)["input_ids"]
        if len(ids) > lm.max_length:
            raise ConfigError(
                f"sentence {number} is {len(ids)} tokens long but the model takes at most "
                f"{lm.max_length}: shorten it"
            )
        rows.append(ids)
    length = max(len(r) for r in rows)
    pad = int(lm.tokenizer.pad_token_id)
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], dtype=torch.long)
    return Batch(ids=ids, mask=mask)


def client_loss(model: nn.Module, kind: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The client's loss: next-token (decoder) or token-wise masked LM (encoder), pads left out."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    labels = ids.masked_fill(mask == 0, -100)
    if kind == "decoder":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


@dataclass(frozen=True)
class LoraSetup:
    """LoRA adapters on the attention projections (the ``peft`` library).

    Attributes:
        rank: The adapters' rank r.
        alpha: LoRA's alpha (the update is scaled by alpha / r).
        targets: Module names to adapt; None: the family's query/key/value.
        b_std: Std of the seeded init of the adapters' B.  peft starts B at
            zero, which makes A's gradient zero; a client in a later round
            holds a trained, non-zero B, which this stands in for.
        seed: Seed of that init.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] | None = None
    b_std: float = 0.02
    seed: int = 0


def with_lora(model: nn.Module, setup: LoraSetup) -> nn.Module:
    """A deep copy of `model` with LoRA adapters (only they are trainable)."""
    from peft import LoraConfig, get_peft_model

    family = str(model.config.model_type)
    targets = setup.targets or LORA_TARGETS.get(family)
    if not targets:
        raise ConfigError(f"no default LoRA targets for '{family}': name the modules")
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ConfigError(
            f"the LoRA target module(s) {', '.join(missing)} do not exist in this "
            f"{family} model: choose among its attention projections"
        )
    if setup.rank < 1:
        raise ConfigError(f"--lora-rank must be 1 or more, got {setup.rank}")
    config = LoraConfig(
        r=setup.rank, lora_alpha=setup.alpha, lora_dropout=0.0, target_modules=list(targets),
        fan_in_fan_out=family == "gpt2",  # GPT-2's Conv1D stores weights as (in, out)
    )  # fmt: skip
    wrapped = get_peft_model(copy.deepcopy(model), config)
    generator = torch.Generator().manual_seed(setup.seed)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * setup.b_std)
    return wrapped.eval()


def observe_batch(
    lm: LanguageModel,
    batch: Batch,
    *,
    lora: LoraSetup | None = None,
    local_steps: int = 1,
    lr: float = 1e-4,
) -> Observation | UpdateObservation:
    """The client's step(s) on its batch, as the server sees them.

    One step: the gradient of every trainable parameter (an `Observation`, the
    model at the weights sent).  Several: plain SGD on the whole batch at
    learning rate `lr`, returned as an `UpdateObservation`.
    """
    if local_steps < 1:
        raise ConfigError(f"--local-steps must be 1 or more, got {local_steps}")
    sent = with_lora(lm.model, lora) if lora is not None else copy.deepcopy(lm.model)
    named = [(n, p) for n, p in sent.named_parameters() if p.requires_grad]
    names = tuple(n for n, _ in named)
    shape = (int(batch.ids.shape[1]), int(lm.model.config.hidden_size))
    vocab = int(lm.model.get_input_embeddings().weight.shape[0])
    if local_steps == 1:
        grads = torch.autograd.grad(
            client_loss(sent, lm.kind, batch.ids, batch.mask), [p for _, p in named],
            allow_unused=True,
        )  # fmt: skip
        gradients = tuple(
            torch.zeros_like(p) if g is None else g.detach()
            for (_, p), g in zip(named, grads, strict=True)
        )
        return Observation(
            model=sent, gradients=gradients, parameter_names=names, input_shape=shape,
            num_classes=vocab, batch_size=int(batch.ids.shape[0]),
        )  # fmt: skip
    client = copy.deepcopy(sent)
    trained = [p for p in client.parameters() if p.requires_grad]
    for _ in range(local_steps):
        grads = torch.autograd.grad(
            client_loss(client, lm.kind, batch.ids, batch.mask), trained, allow_unused=True
        )
        with torch.no_grad():
            for p, g in zip(trained, grads, strict=True):
                if g is not None:
                    p.sub_(lr * g)
    before = {k: v.detach().clone() for k, v in sent.state_dict().items()}
    after = {k: v.detach().clone() for k, v in client.state_dict().items()}
    returned = dict(client.named_parameters())
    update = tuple((returned[n] - p).detach() for n, p in named)
    return UpdateObservation(
        model=sent, sent=before, returned=after, update=update, parameter_names=names,
        input_shape=shape, num_classes=vocab, num_examples=int(batch.ids.shape[0]),
        local_lr=lr, local_steps=local_steps,
    )  # fmt: skip


def _seeded_init_(model: nn.Module, *, generator: torch.Generator) -> None:
    """Normal(0, 0.02) matrices and embeddings, norms at 1, biases at 0, from a generator."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
            elif name.endswith("weight"):  # LayerNorm / RMSNorm gains
                parameter.fill_(1.0)
            else:
                parameter.zero_()
