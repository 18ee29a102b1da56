"""The text task of `gradleak flower-demo`: federated LoRA fine-tuning of a built-in decoder.

No Flower import here: the clients' and the server's work as plain functions,
shared by the Flower apps (`text_apps.py`) and the audit of their capture
(`experiments/audit/text.py`).

* The model: a built-in GPT-2-shaped decoder (`models/text_lm.py`, seeded
  weights, the shipped BPE) frozen, with LoRA adapters (``peft``) on its
  attention projections, as FlowerTune fine-tunes: only the adapters are
  trained and exchanged.  The adapters start as peft starts them (A random,
  B = 0), from a generator seeded by the run's seed.
* The clients: the shipped sentences, permuted once with the run's seed and
  dealt out, `sentences_per_client` each; every round a client draws a batch
  of `batch_size` of its sentences (``SeedSequence([seed, partition,
  round])``) and takes K plain SGD steps of next-token loss on it.
* What the audit needs to rebuild the model is `TextModelSpec`, written into
  the capture's header (``text_model``): the built-in model's name, depth and
  seed, the LoRA config and the tokenizer's checksum.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gradleak.errors import ConfigError, DataError
from gradleak.integrations.capture import PRIVATE_FOLDER
from gradleak.models.text_lm import (
    BUILTIN,
    LORA_TARGETS,
    TOKENIZER_FILE,
    LanguageModel,
    LoraSetup,
    build_language_model,
    client_loss,
    encode_batch,
    with_lora,
)

TEXT_SPEC_KEY = "text_model"
TEXT_FAMILIES = ("gpt2",)  # learned positions: see `text_spec`
TOKENIZER_NAME = "gradleak-bpe"


def tokenizer_sha256() -> str:
    """Checksum of the shipped BPE: a capture names the tokenizer its clients used."""
    return hashlib.sha256(TOKENIZER_FILE.read_bytes()).hexdigest()


@dataclass(frozen=True)
class TextModelSpec:
    """Everything the audit needs to rebuild the clients' model (JSON in the capture).

    Attributes:
        name: A built-in decoder (`models.text_lm.BUILTIN`).
        layers: Its depth (None: the built-in one).
        seed: The seed of its weights.
        lora_rank: The adapters' rank r.
        lora_alpha: LoRA's alpha.
        targets: The adapted modules.
        tokenizer: The tokenizer's name and the sha256 of its file.
    """

    name: str
    layers: int | None
    seed: int
    lora_rank: int
    lora_alpha: float
    targets: tuple[str, ...]
    tokenizer: str = TOKENIZER_NAME
    tokenizer_sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        value = asdict(self)
        value["targets"] = list(self.targets)
        return value

    @classmethod
    def from_json(cls, value: Any, where: str) -> TextModelSpec:
        keys = {"name", "layers", "seed", "lora_rank", "lora_alpha", "targets", "tokenizer"}
        ok = (
            isinstance(value, dict) and keys <= set(value)
            and isinstance(value["name"], str)
            and (value["layers"] is None or _whole(value["layers"]))
            and _whole(value["seed"]) and _whole(value["lora_rank"])
            and isinstance(value["lora_alpha"], int | float)
            and isinstance(value["targets"], list)
            and all(isinstance(t, str) for t in value["targets"])
        )  # fmt: skip
        if not ok:
            raise DataError(f"{where}: 'text_model' is not a text model spec gradleak wrote")
        if value["name"] not in BUILTIN or BUILTIN[value["name"]].family not in TEXT_FAMILIES:
            raise DataError(
                f"{where}: text model '{value['name']}' is not a GPT-2-shaped model built into "
                "this gradleak, which the text audit rebuilds"
            )
        if value["tokenizer"] != TOKENIZER_NAME or value.get("tokenizer_sha256") not in (
            None, "", tokenizer_sha256(),
        ):  # fmt: skip
            raise DataError(
                f"{where}: the clients' tokenizer is not this gradleak's shipped BPE; audit the "
                "capture with the gradleak version that wrote it"
            )
        return cls(
            value["name"], value["layers"], value["seed"], value["lora_rank"],
            float(value["lora_alpha"]), tuple(value["targets"]), value["tokenizer"],
            str(value.get("tokenizer_sha256") or ""),
        )  # fmt: skip

    def lora(self) -> LoraSetup:
        # b_std 0: B starts at zero, as peft starts it (the sent arrays overwrite it anyway).
        return LoraSetup(
            rank=self.lora_rank, alpha=self.lora_alpha, targets=self.targets, b_std=0.0,
            seed=self.seed,
        )  # fmt: skip


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def text_spec(name: str, *, seed: int, rank: int, alpha: float, layers: int | None = None
              ) -> TextModelSpec:  # fmt: skip
    """The spec of a run, checked before any work (one line on bad input).

    Raises:
        ConfigError: Not a built-in decoder, or a LoRA rank the model cannot take.
    """
    if name not in BUILTIN or BUILTIN[name].family not in TEXT_FAMILIES:
        # LLaMA-shaped decoders are refused: with rotary positions the first block gives one
        # position-free candidate set, and at the tolerances a LoRA update over local steps
        # needs, the prefix search grows past its cap (measured: 48,382 prefixes at position
        # 90 on llama-tiny, two sentences a client).
        choices = [n for n, s in BUILTIN.items() if s.family in TEXT_FAMILIES]
        raise ConfigError(
            f"--model '{name}' is not a built-in GPT-2-shaped decoder, which --task text "
            f"fine-tunes: choose one of {', '.join(choices)}"
        )
    width = BUILTIN[name].width
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= width:
        raise ConfigError(
            f"--lora-rank must be between 1 and the model's width {width}, got {rank!r}"
        )
    if not (np.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"--lora-alpha must be a number above 0, got {alpha:g}")
    targets = LORA_TARGETS[BUILTIN[name].family]
    return TextModelSpec(name, layers, seed, rank, float(alpha), targets, TOKENIZER_NAME,
                         tokenizer_sha256())  # fmt: skip


def base_model(spec: TextModelSpec) -> LanguageModel:
    """The frozen seeded decoder every party builds from the spec."""
    return build_language_model(spec.name, seed=spec.seed, layers=spec.layers)


def lora_model(spec: TextModelSpec, lm: LanguageModel | None = None) -> nn.Module:
    """The decoder with fresh adapters: A from peft's init under a seeded generator, B = 0."""
    lm = lm or base_model(spec)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft asks transformers a deprecated question; the user can do nothing about it.
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        torch.manual_seed(spec.seed)  # peft draws A from the global generator
        return with_lora(lm.model, spec.lora())


def adapter_names(model: nn.Module) -> list[str]:
    """The trainable (adapter) parameters' names, in the model's order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a party sends: the adapters only, detached copies."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_adapters(model: nn.Module, state: dict[str, Any], where: str = "the arrays") -> None:
    """Set `model`'s adapters to `state` (NumPy arrays or tensors), names and shapes checked.

    Raises:
        DataError: A missing or extra adapter, or a shape that does not fit.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        missing = sorted(set(params) - set(state))
        extra = sorted(set(state) - set(params))
        what = f"lacks {missing[0]}" if missing else f"holds the unknown array {extra[0]}"
        raise DataError(f"{where} {what}: not the adapters of this LoRA model")
    with torch.no_grad():
        for name, value in state.items():
            tensor = torch.as_tensor(np.asarray(value), dtype=params[name].dtype)
            if tensor.shape != params[name].shape:
                raise DataError(
                    f"{where}: {name} has shape {tuple(tensor.shape)}, the model's "
                    f"{tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)


# --- the clients ----------------------------------------------------------------------------


def client_sentences(
    sentences: list[str], *, seed: int, partition: int, partitions: int, per_client: int
) -> list[str]:
    """A client's private sentences: its deal of the seeded permutation of the shipped set."""
    order = np.random.default_rng(seed).permutation(len(sentences))
    part = order[partition::partitions][:per_client]
    return [sentences[int(i)] for i in part]


def round_batch(
    held: list[str], *, seed: int, partition: int, server_round: int, batch_size: int
) -> list[str]:
    """The round's batch: `batch_size` distinct sentences of the client's own, drawn afresh."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, partition, server_round]))
    picks = sorted(rng.choice(len(held), batch_size, replace=False).tolist())
    return [held[i] for i in picks]


def local_train_text(
    model: nn.Module, lm: LanguageModel, sentences: list[str], *, lr: float, steps: int
) -> float:
    """Plain SGD on the adapters, `steps` steps of next-token loss on the whole batch."""
    batch = encode_batch(lm, sentences)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trained, lr=lr)
    loss = torch.zeros(())
    for _ in range(steps):
        optimizer.zero_grad()
        loss = client_loss(model, lm.kind, batch.ids, batch.mask)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def save_private_sentences(
    captures: Path, server_round: int, node_id: int, partition: int, sentences: list[str]
) -> Path:
    """A client's batch of a round, as JSON beside the capture: the demo's ground truth."""
    folder = captures / PRIVATE_FOLDER / f"round-{int(server_round):04d}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"node-{int(node_id)}.json"
    payload = {"partition": int(partition), "sentences": list(sentences)}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_private_sentences(captures: Path, server_round: int, node_id: int) -> list[str] | None:
    """The ground truth a demo client saved, or None (a capture of someone else's run)."""
    path = captures / PRIVATE_FOLDER / f"round-{int(server_round):04d}" / f"node-{node_id}.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DataError(f"{path} is not readable JSON: delete it or rerun the demo") from None
    sentences = value.get("sentences") if isinstance(value, dict) else None
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise DataError(f"{path} must hold {{'sentences': [text, ...]}}")
    return sentences


def check_text_run(
    sentences: list[str],
    *,
    clients: int,
    per_client: int,
    batch_size: int,
) -> None:
    """Refuse, in one line, a split the shipped sentences cannot give.

    Raises:
        ConfigError: Too few sentences for the clients, or a batch above a client's sentences.
    """
    if per_client < 1:
        raise ConfigError(f"--sentences-per-client must be 1 or more, got {per_client}")
    if batch_size > per_client:
        raise ConfigError(
            f"--batch-size {batch_size} exceeds --sentences-per-client {per_client}: a client "
            "draws its batch from its own sentences"
        )
    if clients * per_client > len(sentences):
        raise ConfigError(
            f"{clients} clients x {per_client} sentences need {clients * per_client}, the "
            f"shipped set holds {len(sentences)}: use fewer clients or sentences per client"
        )
