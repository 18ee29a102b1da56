"""DLG on text: rebuild a sentence from a masked language model's gradient.

DLG (Zhu, Liu, Han; NeurIPS 2019) recovers text token by token: optimise dummy
token embeddings (and dummy labels) until their gradient matches the shared
one, then map each position to its nearest vocabulary token.  Before that,
this attack reads off the gradient the sentence length (the non-zero rows of
the position embeddings' gradient) and which tokens occur: the non-zero rows of
the word embeddings' gradient when the output layer is not tied to them, else
the tokens whose output-bias gradient is negative (iDLG's sign rule, per
token).  Dummy labels and the nearest-token search are restricted to those.

Modes: ``faithful`` is the paper's (free dummy embeddings and labels, plain
L-BFGS at lr 1).  ``improved`` (default) gives each position one soft token
distribution that is both its dummy label and, through the embedding matrix,
its dummy embedding; the word embeddings' gradient then joins the matching,
L-BFGS uses a strong-Wolfe line search in float64, and a stalled run restarts.
Both stop once the decoded sentence itself reproduces the shared gradient.

The attacker knows the weights, the tokenizer's frame ([CLS] and [SEP] ids)
and the objective (every word position predicts its own token).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradleak.attacks.dlg import require_nonzero_gradient
from gradleak.attacks.threads import attack_threads
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.types import Observation

log = logging.getLogger(__name__)

StepCallback = Callable[[int, float], None]
MODES = ("improved", "faithful")
TEXT_ZERO_HINT = "a client loss of exactly zero has no gradient; check the model and the step"


@dataclass(frozen=True)
class TextAttackConfig:
    """How the text attack optimises; L-BFGS settings are DLG's.

    Attributes:
        mode: "improved" (tied soft tokens, line search) or "faithful" (the paper's).
        iterations: L-BFGS steps in all (DLG used 100 for text).
        lr: L-BFGS learning rate.
        history_size: L-BFGS memory.
        max_iter: Inner L-BFGS iterations per step.
        trace_every: Decode the dummy every this many steps for the trace.
        relative_tolerance: Stop once the matching loss is below this share of
            the shared gradient's squared norm.
        patience: Improved mode: a run has stalled when its loss has not fallen
            by 10% over this many steps; it restarts from a fresh draw.
        max_restarts: Improved mode: at most this many fresh starts.
    """

    mode: str = "improved"
    iterations: int = 100
    lr: float = 1.0
    history_size: int = 100
    max_iter: int = 20
    trace_every: int = 1
    relative_tolerance: float = 1e-9
    patience: int = 10
    max_restarts: int = 3

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode '{self.mode}': choose one of {', '.join(MODES)}")
        if min(self.iterations, self.history_size, self.max_iter, self.trace_every, self.lr) <= 0:
            raise ConfigError(
                "iterations, history_size, max_iter, trace_every, lr must be positive"
            )


@dataclass(frozen=True)
class TextReconstruction:
    """What the text attack recovered.

    Attributes:
        token_ids: Recovered ids, ``(length,)``, the frame ([CLS], [SEP]) included.
        candidates: Token ids the gradient says occur (the search space).
        leak: Where they came from: "embedding rows", "output bias" or "none".
        trace: ``(step, token_ids)`` every `trace_every` steps, from step 0.
        loss_history: Matching loss of the soft dummy at the start of each step.
        matching_loss: Matching loss of the recovered tokens themselves.
        steps: L-BFGS steps taken over all restarts.
        evaluations: Gradient-matching evaluations.
        restarts: Fresh starts after the first.
        converged: Whether `matching_loss` fell below the tolerance: the
            recovered sentence reproduces the shared gradient.
    """

    token_ids: torch.Tensor
    candidates: tuple[int, ...]
    leak: str
    trace: tuple[tuple[int, tuple[int, ...]], ...] = ()
    loss_history: tuple[float, ...] = ()
    matching_loss: float = float("nan")
    steps: int = 0
    evaluations: int = 0
    restarts: int = 0
    converged: bool = False


def sequence_length(observation: Observation) -> int:
    """Tokens in the input: the rows of the position embeddings' gradient that are non-zero."""
    for name, grad in zip(observation.parameter_names, observation.gradients, strict=True):
        if name.endswith("position_embeddings.weight"):
            return int((grad.abs().sum(dim=1) > 0).sum())
    return int(observation.input_shape[0])  # no learned positions: assume the length is known


def leaked_tokens(
    observation: Observation, *, exclude: tuple[int, ...] = ()
) -> tuple[list[int], str]:
    """Token ids the gradient shows to occur (besides `exclude`), and how it shows them."""
    model = observation.model
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    grads = dict(zip(observation.parameter_names, observation.gradients, strict=True))
    names = {id(p): n for n, p in model.named_parameters()}
    tied = output is not None and output.weight is embedding
    found: list[int] = []
    how = "none"
    if not tied and names.get(id(embedding)) in grads:
        rows = grads[names[id(embedding)]].abs().sum(dim=1) > 0
        found, how = rows.nonzero().flatten().tolist(), "embedding rows"
    elif output is not None and getattr(output, "bias", None) is not None:
        bias_grad = grads.get(names.get(id(output.bias), ""))
        if bias_grad is not None and bias_grad.abs().sum() > 0:
            found, how = (bias_grad < 0).nonzero().flatten().tolist(), "output bias"
    if not found:
        log.warning("the gradient does not show which tokens occur; searching the whole vocabulary")
        found, how = list(range(embedding.shape[0])), "none"
    return [t for t in found if t not in exclude], how


class TextDLG:
    """Deep Leakage from Gradients on a masked language model (Zhu et al., 2019).

    https://arxiv.org/abs/1906.08935. Configure once, call on observations of
    one sentence's masked-language-model step.  Defaults: L-BFGS lr 1,
    history 100, 20 inner iterations, 100 steps (the paper's text protocol).

    Shapes: recovers ``(length,)`` token ids; the length is read off the gradient.
    """

    def __init__(self, config: TextAttackConfig | None = None, **overrides: object) -> None:
        self.config = dataclasses.replace(config or TextAttackConfig(), **overrides)

    def __repr__(self) -> str:
        return f"TextDLG({self.config})"

    def __call__(
        self,
        observation: Observation,
        *,
        frame: tuple[int, int],
        seed: int = 0,
        callback: StepCallback | None = None,
    ) -> TextReconstruction:
        """Attack one observation.

        Args:
            observation: The shared gradient of one sentence's MLM step.
            frame: Ids of the tokens around every sentence ([CLS], [SEP]).
            seed: Seed of the dummy initialisation (equal seeds, equal results).
            callback: Called as ``callback(step, loss)`` after every step.

        Raises:
            AttackNotApplicable: The shared gradient is all zeros, or shows
                too few positions or tokens.
        """
        require_nonzero_gradient(observation, hint=TEXT_ZERO_HINT)
        with attack_threads(observation.device):
            return self._attack(observation, frame, seed, callback)

    def _attack(
        self,
        observation: Observation,
        frame: tuple[int, int],
        seed: int,
        callback: StepCallback | None,
    ) -> TextReconstruction:
        config = self.config
        length = sequence_length(observation)
        if length < 3:
            raise AttackNotApplicable(f"the gradient shows {length} positions; need 3 or more")
        candidates, leak = leaked_tokens(observation, exclude=frame)
        if not candidates:
            raise AttackNotApplicable("the gradient shows no token besides [CLS] and [SEP]")
        problem = _Problem(observation, config, frame, length - 2, candidates)
        generator = torch.Generator().manual_seed(seed)
        run = _Run()
        best: tuple[float, torch.Tensor] | None = None
        while True:
            loss, ids = problem.optimise(generator, run, callback)
            if best is None or not math.isfinite(best[0]) or loss < best[0]:
                best = (loss, ids)
            retry = (
                config.mode == "improved"
                and loss >= problem.tolerance
                and run.restarts < config.max_restarts
                and run.steps < config.iterations
            )
            if not retry:
                break
            run.restarts += 1
        loss, ids = best
        return TextReconstruction(
            token_ids=ids,
            candidates=tuple(candidates),
            leak=leak,
            trace=tuple(run.trace),
            loss_history=tuple(run.history),
            matching_loss=loss,
            steps=run.steps,
            evaluations=run.evaluations,
            restarts=run.restarts,
            converged=loss < problem.tolerance,
        )


@dataclasses.dataclass
class _Run:
    """Counters and records that survive restarts."""

    steps: int = 0
    evaluations: int = 0
    restarts: int = 0
    history: list[float] = dataclasses.field(default_factory=list)
    trace: list[tuple[int, tuple[int, ...]]] = dataclasses.field(default_factory=list)


class _Problem:
    """One gradient to match: the model in the attack's precision and the shared target."""

    def __init__(
        self,
        observation: Observation,
        config: TextAttackConfig,
        frame: tuple[int, int],
        words: int,
        candidates: list[int],
    ) -> None:
        self.config = config
        self.dtype = torch.float64 if config.mode == "improved" else torch.float32
        self.model = copy.deepcopy(observation.model).to(self.dtype).eval()
        self.device = observation.device
        self.frame = torch.tensor(frame, device=self.device)
        self.candidates = torch.tensor(candidates, device=self.device)
        self.words = words
        self.embedding = self.model.get_input_embeddings().weight
        named = dict(self.model.named_parameters())
        shared = dict(zip(observation.parameter_names, observation.gradients, strict=True))
        # Free dummy embeddings never touch the embedding matrix, so its gradient
        # cannot be matched in faithful mode; improved mode builds inputs from it.
        faithful = config.mode == "faithful"
        keep = [n for n in shared if n in named and not (faithful and named[n] is self.embedding)]
        # Drop parameters the forward pass never reaches (their gradient is None).
        probe = self._inputs_and_soft(self._draw(torch.Generator().manual_seed(0)))
        grads = torch.autograd.grad(
            self._client_loss(*probe), [named[n] for n in keep], allow_unused=True
        )
        keep = [n for n, g in zip(keep, grads, strict=True) if g is not None]
        self.parameters = [named[n] for n in keep]
        self.shared = [shared[n].to(self.dtype) for n in keep]
        self.tolerance = config.relative_tolerance * float(sum((g**2).sum() for g in self.shared))

    def _draw(self, generator: torch.Generator) -> list[torch.Tensor]:
        shape = (self.words, len(self.candidates))
        if self.config.mode == "improved":  # near-uniform soft tokens
            draws = [0.1 * torch.randn(shape, generator=generator)]
        else:  # embeddings at the embedding matrix's scale, DLG's random label logits
            scale = float(self.embedding.detach().std())
            x = scale * torch.randn((self.words, self.embedding.shape[1]), generator=generator)
            draws = [x, torch.randn(shape, generator=generator)]
        return [v.to(self.device, self.dtype).requires_grad_(True) for v in draws]

    def _inputs_and_soft(self, variables: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings of the dummy (frame included) and its soft labels."""
        if self.config.mode == "improved":
            soft = F.softmax(variables[0], dim=-1)
            words = soft @ self.embedding[self.candidates]
        else:
            words, soft = variables[0], F.softmax(variables[1], dim=-1)
        ends = self.embedding[self.frame]
        return torch.cat([ends[:1], words, ends[1:]]).unsqueeze(0), soft

    def _client_loss(self, inputs: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        """The client's objective replayed on a dummy: soft labels over the candidates."""
        logits = self.model(inputs_embeds=inputs).logits[0, 1:-1]
        log_probs = F.log_softmax(logits, dim=-1)[:, self.candidates]
        return -(soft * log_probs).sum(dim=-1).mean()

    def _distance(self, inputs: torch.Tensor, soft: torch.Tensor, graph: bool) -> torch.Tensor:
        """DLG's objective: squared L2 distance between dummy and shared gradients."""
        loss = self._client_loss(inputs, soft)
        dummy = torch.autograd.grad(loss, self.parameters, create_graph=graph)
        return sum(((d - s) ** 2).sum() for d, s in zip(dummy, self.shared, strict=True))

    def decode(self, variables: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Each position's nearest candidate (Euclidean), and how well that sentence matches.

        The second value is the matching loss of the decoded tokens themselves
        (one-hot inputs and labels): near zero exactly when the decoded
        sentence reproduces the shared gradient.
        """
        with torch.no_grad():
            inputs, _ = self._inputs_and_soft(variables)
            nearest = torch.cdist(inputs[0, 1:-1], self.embedding[self.candidates]).argmin(dim=1)
        onehot = F.one_hot(nearest, len(self.candidates)).to(self.dtype)
        hard = torch.cat([self.frame[:1], self.candidates[nearest], self.frame[1:]])
        with torch.enable_grad():
            loss = float(self._distance(self.embedding[hard].unsqueeze(0), onehot, graph=False))
        return hard.cpu(), loss

    def optimise(
        self, generator: torch.Generator, run: _Run, callback: StepCallback | None
    ) -> tuple[float, torch.Tensor]:
        """One run from a fresh draw: the decoded sentence's matching loss, and its ids."""
        config = self.config
        variables = self._draw(generator)
        line_search = "strong_wolfe" if config.mode == "improved" else None
        optimiser = torch.optim.LBFGS(
            variables, lr=config.lr, max_iter=config.max_iter,
            history_size=config.history_size, line_search_fn=line_search,
        )  # fmt: skip

        def closure() -> torch.Tensor:
            run.evaluations += 1
            loss = self._distance(*self._inputs_and_soft(variables), graph=True)
            for v, g in zip(variables, torch.autograd.grad(loss, variables), strict=True):
                v.grad = g
            return loss.detach()

        ids, hard_loss = self.decode(variables)
        run.trace.append((run.steps, tuple(ids.tolist())))
        best_recent, since_progress = math.inf, 0
        while run.steps < config.iterations and hard_loss >= self.tolerance:
            loss = float(optimiser.step(closure))  # the loss where this step started
            run.steps += 1
            run.history.append(loss)
            ids, hard_loss = self.decode(variables)
            if callback is not None:
                callback(run.steps, loss)
            if run.steps % config.trace_every == 0 or hard_loss < self.tolerance:
                run.trace.append((run.steps, tuple(ids.tolist())))
            if not math.isfinite(loss):
                break
            best_recent, since_progress = (
                (loss, 0) if loss < 0.9 * best_recent else (best_recent, since_progress + 1)
            )
            if config.mode == "improved" and since_progress >= config.patience:
                break  # stalled: the caller restarts from a fresh draw
        if run.trace[-1][0] != run.steps:
            run.trace.append((run.steps, tuple(ids.tolist())))
        return hard_loss, ids
