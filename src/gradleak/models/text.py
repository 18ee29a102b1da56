"""The text victim: a masked language model, its tokenizer, and the client's step.

The built-in model is a small BERT (``BertForMaskedLM``) built from a config
with a seeded random initialisation: nothing is downloaded.  Its tokenizer is
word-level over a vocabulary shipped with the package (`text_vocab.txt`: the
special tokens, punctuation, digits and about 2,000 common lowercase English
words).  Any masked language model and tokenizer saved with
``save_pretrained`` can be used instead (`load_text_model`).

The client's step (`observe_mlm`) follows DLG's token-wise setting: the
masked-language-model head predicts every word of the sentence, so the labels
are the sentence's own tokens (no token is replaced by [MASK]); [CLS] and
[SEP] are not predicted.  Dropout is off (the built-in config has none, and a
loaded model is put in eval mode): the attacker replays the step and cannot
know a client's dropout masks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.errors import ConfigError
from gradleak.types import Observation

log = logging.getLogger(__name__)

VOCAB_FILE = Path(__file__).with_name("text_vocab.txt")
SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Weights in formats that are not safetensors (pickles and the like): refused.
UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack")
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


@dataclass(frozen=True)
class TextModelConfig:
    """Size of the built-in BERT (small enough for a CPU attack in seconds).

    Attributes:
        hidden_size: Width of the embeddings and hidden states.
        layers: Transformer layers.
        heads: Attention heads per layer.
        intermediate_size: Width of the feed-forward layers.
        max_positions: Longest input in tokens, [CLS] and [SEP] included.
        init_std: Standard deviation of the normal init (BERT's 0.02).
    """

    hidden_size: int = 32
    layers: int = 2
    heads: int = 2
    intermediate_size: int = 64
    max_positions: int = 64
    init_std: float = 0.02


@dataclass(frozen=True)
class TextModel:
    """A masked language model with its tokenizer and a name for reports."""

    model: nn.Module
    tokenizer: object  # a transformers tokenizer
    name: str

    @property
    def frame(self) -> tuple[int, int]:
        """Ids of the tokens the tokenizer puts before and after a sentence."""
        return int(self.tokenizer.cls_token_id), int(self.tokenizer.sep_token_id)

    @property
    def max_length(self) -> int:
        """Longest input the model takes, in tokens."""
        return int(self.model.config.max_position_embeddings)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of token ids (unknown words stay visible as [UNK])."""
        return str(self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False))


def builtin_tokenizer() -> object:
    """The word-level tokenizer over the shipped vocabulary.

    Lowercases, strips accents, splits on whitespace and punctuation, and adds
    [CLS] ... [SEP]; words outside the vocabulary become [UNK].
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = VOCAB_FILE.read_text(encoding="utf-8").split("\n")
    vocab = {word: i for i, word in enumerate(w for w in words if w)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = SPECIAL_TOKENS["cls"], SPECIAL_TOKENS["sep"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins punctuation
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, **{f"{k}_token": v for k, v in SPECIAL_TOKENS.items()}
    )


def build_text_model(config: TextModelConfig | None = None, *, seed: int = 0) -> TextModel:
    """The built-in BERT with a seeded init, and its tokenizer.

    The output layer is not tied to the word embeddings, so that the word
    embeddings' gradient comes from the input alone (rows of absent tokens
    are exactly zero).  Attention is the plain ("eager") implementation: the
    attack differentiates the gradient, and fused attention kernels have no
    second derivative.
    """
    from transformers import BertConfig, BertForMaskedLM

    config = config or TextModelConfig()
    tokenizer = builtin_tokenizer()
    bert_config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager",
    )
    model = BertForMaskedLM(bert_config)
    _normal_init_(model, std=config.init_std, generator=torch.Generator().manual_seed(seed))
    return TextModel(model=model.eval(), tokenizer=tokenizer, name="builtin-bert")


def load_text_model(path: str | Path) -> TextModel:
    """A masked language model and its tokenizer from a folder on disk.

    Only safetensors weights are loaded (``model.safetensors``, or the shards
    ``model.safetensors.index.json`` names), never a pickle such as
    ``pytorch_model.bin``: unpickling a file can run code.  The weights'
    headers and config.json's ``model_type`` are checked before transformers
    is called, so that a cut-off or foreign folder gets one clear line.

    Raises:
        ConfigError: The folder is missing, holds no safetensors weights or
            no loadable model and tokenizer, or its files are cut off.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(
            f"model folder '{path}' not found: give a folder written by save_pretrained"
        )
    weights = _safetensors_files(folder, path)
    if not weights:
        unsafe = sorted(p.name for p in folder.iterdir() if p.name.endswith(UNSAFE_SUFFIXES))
        if unsafe:
            raise ConfigError(
                f"'{path}' holds {unsafe[0]} but no model.safetensors: gradleak loads only "
                "safetensors weights (unpickling a file can run code); re-save the model with "
                "save_pretrained(folder, safe_serialization=True)"
            )
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"'{path}' holds no config.json: give a folder where a masked language model "
            "and its tokenizer were saved with save_pretrained"
        )
    if not weights:
        raise ConfigError(
            f"'{path}' holds no model.safetensors: save the model there with "
            "save_pretrained(folder, safe_serialization=True)"
        )
    _check_model_type(folder, path)
    for file in weights:
        _check_safetensors(file)
    from safetensors import SafetensorError
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForMaskedLM.from_pretrained(
            folder, local_files_only=True, use_safetensors=True, attn_implementation="eager"
        )
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"could not load a masked language model and tokenizer from '{path}': {reason}"
        ) from None
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise ConfigError(f"the tokenizer in '{path}' has no [CLS]/[SEP]-style tokens")
    return TextModel(model=model.eval(), tokenizer=tokenizer, name=str(folder))


def _safetensors_files(folder: Path, path: str | Path) -> list[Path]:
    """The folder's safetensors weights (one file, or the shards an index names); [] if none."""
    single = folder / SAFETENSORS_WEIGHTS
    if single.is_file():
        return [single]
    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        return []
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(
            f"'{index}' is not a valid weights index: save the model again with save_pretrained"
        ) from None
    for shard in shards:
        if not (folder / shard).is_file():
            raise ConfigError(
                f"'{path}' lacks {shard}, a weights shard its {SAFETENSORS_INDEX} names: "
                "copy the whole folder, or save the model again"
            )
    return [folder / shard for shard in shards]


def _check_model_type(folder: Path, path: str | Path) -> None:
    """Refuse a config.json that is not JSON or names no masked LM transformers knows."""
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"'{config_file}' is not valid JSON ({reason}): save the model again with "
            "save_pretrained"
        ) from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(
            f"'{config_file}' names no model_type: save the model again with save_pretrained"
        )
    try:
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
    except ImportError:  # a transformers that keeps them elsewhere: its own error will do
        return
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ConfigError(
            f"'{config_file}' has model_type '{model_type}', which transformers "
            f"{transformers.__version__} does not know: give a masked language model it "
            "supports (e.g. bert, roberta, distilbert)"
        )
    if model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise ConfigError(
            f"'{path}' holds a '{model_type}' model, which is not a masked language model: "
            "give one such as bert, roberta or distilbert"
        )


def _check_safetensors(file: Path) -> None:
    """Refuse a safetensors file that is cut off or corrupt (its header is checked)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as weights:
            weights.keys()
    except (SafetensorError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
        raise ConfigError(
            f"the weights file '{file}' is cut off or corrupt ({reason}): copy it again, or "
            "save the model again with save_pretrained"
        ) from None


def check_sentence(sentence: str) -> None:
    """Raise `ConfigError` for an empty sentence (before any model is built)."""
    if not sentence.strip():
        raise ConfigError("the sentence is empty: give a few words to attack")


def encode(text_model: TextModel, sentence: str) -> torch.Tensor:
    """Token ids of one sentence, [CLS] and [SEP] included, shape ``(length,)``.

    Raises:
        ConfigError: The sentence is empty or longer than the model takes.
    """
    check_sentence(sentence)
    ids = text_model.tokenizer(sentence)["input_ids"]
    if len(ids) <= 2:
        raise ConfigError(f"the sentence {sentence!r} has no tokens once tokenized")
    if len(ids) > text_model.max_length:
        raise ConfigError(
            f"the sentence is {len(ids)} tokens long with [CLS] and [SEP], but the model "
            f"takes at most {text_model.max_length}: shorten it"
        )
    unknown = ids.count(text_model.tokenizer.unk_token_id)
    if unknown:
        log.warning("%d word(s) are outside the vocabulary and become [UNK]", unknown)
    return torch.tensor(ids, dtype=torch.long)


def mlm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The client's loss: cross-entropy of every word position against its own token.

    `logits` is ``(length, vocab)`` and `ids` ``(length,)``; the first and last
    positions ([CLS], [SEP]) are not predicted.
    """
    return F.cross_entropy(logits[1:-1], ids[1:-1])


def observe_mlm(model: nn.Module, ids: torch.Tensor) -> Observation:
    """The client's masked-language-model step on one sentence, as the server sees it.

    Returns the gradient of every trainable parameter (zeros where the step
    does not reach a parameter) with the model, ``input_shape`` of
    ``(length, hidden_size)`` and the vocabulary size as ``num_classes``.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    logits = model(input_ids=ids.unsqueeze(0)).logits[0]
    grads = torch.autograd.grad(mlm_loss(logits, ids), [p for _, p in named], allow_unused=True)
    gradients = tuple(
        torch.zeros_like(p) if g is None else g.detach()
        for (_, p), g in zip(named, grads, strict=True)
    )
    return Observation(
        model=model,
        gradients=gradients,
        parameter_names=tuple(n for n, _ in named),
        input_shape=(int(ids.shape[0]), int(model.config.hidden_size)),
        num_classes=int(logits.shape[-1]),
    )


def _normal_init_(model: nn.Module, *, std: float, generator: torch.Generator) -> None:
    """BERT's init (normal weights, zero biases, unit LayerNorm) from a generator."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        for name, parameter in model.named_parameters():
            if name.endswith("predictions.bias"):
                parameter.zero_()
