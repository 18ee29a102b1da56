"""The optimisation baseline for text batches (TAG / LAMP-style).

TAG: Gradient Attack on Transformer-based Language Models (Deng et al.,
Findings of EMNLP 2021), https://arxiv.org/abs/2103.06819; LAMP: Extracting
Text from Gradients with Language Model Priors (Balunović et al., NeurIPS
2022), https://arxiv.org/abs/2202.08827.

Every position of every sequence holds a free logit vector over the
vocabulary; its softmax mixes the token embeddings into the model's input,
and the client's loss (next-token or masked LM, soft labels from the same
mixtures) is replayed on that dummy.  Adam minimises TAG's distance between
the dummy's gradient and the shared one (squared L2 plus ``l1_weight`` times
L1); each position is then read off as its most likely token.  As in TAG and
LAMP, the batch size and each sequence's length are known to the attacker,
and the frame tokens (``<s>``, ``</s>``) are fixed.  LAMP's language-model
prior and discrete moves are not implemented: this is the continuous part
both share.

Shapes: recovers ``B`` sequences of the given lengths; FedSGD gradients only.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradleak.attacks.threads import attack_threads
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.types import Observation

StepCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class TagConfig:
    """TAG's settings.

    Attributes:
        iterations: Adam steps.
        lr: Adam's step size on the logits.
        l1_weight: TAG's weight of the L1 term.
        init_std: Std of the initial logits.
    """

    iterations: int = 300
    lr: float = 0.1
    l1_weight: float = 0.01
    init_std: float = 1.0

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.lr <= 0 or self.l1_weight < 0:
            raise ConfigError("TAG needs iterations >= 1, lr > 0 and l1_weight >= 0")


@dataclass(frozen=True)
class TagReconstruction:
    """Recovered sequences (frame included, without padding) and the run's record."""

    sequences: tuple[tuple[int, ...], ...]
    loss_history: tuple[float, ...]
    seconds: float = 0.0


class TagAttack:
    """TAG/LAMP-style gradient matching over soft tokens (see the module docstring)."""

    def __init__(self, config: TagConfig | None = None, **overrides: object) -> None:
        self.config = dataclasses.replace(config or TagConfig(), **overrides)

    def __repr__(self) -> str:
        return f"TagAttack({self.config})"

    def __call__(
        self,
        observation: Observation,
        *,
        lengths: list[int],
        bos: int,
        eos: int,
        decoder: bool,
        seed: int = 0,
        callback: StepCallback | None = None,
    ) -> TagReconstruction:
        """Recover `len(lengths)` sequences of those lengths (frame included).

        Raises:
            AttackNotApplicable: Not a FedSGD gradient, or a sequence too short.
        """
        if not isinstance(observation, Observation):
            raise AttackNotApplicable("the TAG baseline attacks a FedSGD gradient, not an update")
        if min(lengths) < 3:
            raise AttackNotApplicable("every sequence needs a token between <s> and </s>")
        start = time.perf_counter()
        with attack_threads(observation.device):
            sequences, history = self._attack(
                observation, lengths, bos, eos, decoder, seed, callback
            )
        return TagReconstruction(sequences, history, time.perf_counter() - start)

    def _attack(
        self,
        observation: Observation,
        lengths: list[int],
        bos: int,
        eos: int,
        decoder: bool,
        seed: int,
        callback: StepCallback | None,
    ) -> tuple[tuple[tuple[int, ...], ...], tuple[float, ...]]:
        config = self.config
        model = copy.deepcopy(observation.model).eval()
        named = dict(model.named_parameters())
        shared = dict(zip(observation.parameter_names, observation.gradients, strict=True))
        names = [n for n in observation.parameter_names if n in named]
        parameters = [named[n] for n in names]
        targets = [shared[n] for n in names]
        embedding = model.get_input_embeddings().weight  # in the graph: its gradient is matched too
        vocab = embedding.shape[0]
        batch, width = len(lengths), max(lengths)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for row, length in enumerate(lengths):
            mask[row, :length] = 1
        inner = torch.tensor([length - 2 for length in lengths])
        generator = torch.Generator().manual_seed(seed)
        logits = (config.init_std * torch.randn((batch, width, vocab), generator=generator)).to(
            observation.device
        )
        logits.requires_grad_(True)
        fixed = torch.zeros((batch, width, vocab), device=observation.device)
        fixed[:, 0, bos] = 1.0
        for row, length in enumerate(lengths):
            fixed[row, length - 1, eos] = 1.0
        free = torch.zeros((batch, width, 1), device=observation.device)
        for row, count in enumerate(inner.tolist()):
            free[row, 1 : 1 + count] = 1.0
        mask = mask.to(observation.device)
        optimiser = torch.optim.Adam([logits], lr=config.lr)
        history: list[float] = []

        def soft_tokens() -> torch.Tensor:
            return free * F.softmax(logits, dim=-1) + (1 - free) * fixed

        for step in range(config.iterations):
            probs = soft_tokens()
            out = model(inputs_embeds=probs @ embedding, attention_mask=mask).logits
            log_probs = F.log_softmax(out, dim=-1)
            weight = mask.unsqueeze(-1).to(log_probs.dtype)
            if decoder:
                loss_terms = -(probs[:, 1:] * log_probs[:, :-1] * weight[:, 1:]).sum()
                loss = loss_terms / mask[:, 1:].sum()
            else:
                loss = -(probs * log_probs * weight).sum() / mask.sum()
            dummy = torch.autograd.grad(loss, parameters, create_graph=True)
            distance = sum(((d - t) ** 2).sum() for d, t in zip(dummy, targets, strict=True))
            if config.l1_weight:
                distance = distance + config.l1_weight * sum(
                    (d - t).abs().sum() for d, t in zip(dummy, targets, strict=True)
                )
            optimiser.zero_grad()
            distance.backward()
            optimiser.step()
            history.append(float(distance.detach()))
            if callback is not None:
                callback(step + 1, history[-1])
        with torch.no_grad():
            ids = soft_tokens().argmax(dim=-1).cpu()
        sequences = tuple(tuple(ids[row, :length].tolist()) for row, length in enumerate(lengths))
        return sequences, tuple(history)
