"""The values that cross the victim/attacker boundary.

An `Observation` is everything a curious server (or peer) holds after one
FedSGD step of a client: the model it sent out and the gradient that came
back.  An `UpdateObservation` is what it holds after a FedAvg round: the
weights it sent, the weights that came back after the client's local SGD
steps, and the local schedule it configured.  A `Reconstruction` is what an
attack makes of either.  Attacks import this module and nothing on the
victim's side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class ClientOptimizer:
    """The optimiser a FedAvg client trains with, as ``torch.optim`` defines it.

    The server wrote the client app, so it knows which optimiser its clients
    run and with which settings (the learning rate is the round's
    ``local_lr``).  ``kind`` "sgd" is ``torch.optim.SGD(momentum, nesterov,
    weight_decay)`` (dampening 0); "adam" and "adamw" are ``torch.optim.Adam``
    and ``AdamW`` with ``betas``, ``eps`` and ``weight_decay`` (no amsgrad).
    A client builds a fresh optimiser every round (as Flower's quickstart
    client does), so momentum and Adam's moments start at zero each round.

    Attributes:
        kind: "sgd", "adam" or "adamw".
        momentum: SGD's momentum (0 for plain SGD).
        nesterov: SGD's Nesterov momentum (needs momentum above 0).
        weight_decay: L2 penalty (SGD, Adam) or decoupled decay (AdamW).
        betas: Adam's running-average coefficients.
        eps: Adam's denominator term.
    """

    kind: str = "sgd"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.kind!r}")
        for name in ("momentum", "weight_decay", "eps"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number 0 or more, got {value!r}")
        if self.momentum >= 1:
            raise ValueError(f"momentum must be below 1, got {self.momentum!r}")
        if self.nesterov and (self.kind != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs the sgd optimizer with a momentum above 0")
        betas = tuple(float(b) for b in self.betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.kind != "sgd" and self.momentum:
            raise ValueError(f"momentum is SGD's; {self.kind} has betas instead")
        object.__setattr__(self, "betas", betas)

    @property
    def plain(self) -> bool:
        """Plain SGD: no momentum, no weight decay."""
        return self.kind == "sgd" and self.momentum == 0 and self.weight_decay == 0

    def build(self, parameters: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
        """The ``torch.optim`` optimiser the client runs."""
        if self.kind == "sgd":
            return torch.optim.SGD(
                parameters,
                lr=lr,
                momentum=self.momentum,
                nesterov=self.nesterov,
                weight_decay=self.weight_decay,
            )
        kind = torch.optim.Adam if self.kind == "adam" else torch.optim.AdamW
        return kind(
            parameters, lr=lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay
        )

    def describe(self) -> str:
        """A short label for reports: "sgd", "sgd momentum 0.9 nesterov", "adam wd 0.01"."""
        parts = [self.kind]
        if self.momentum:
            parts.append(f"momentum {self.momentum:g}")
        if self.nesterov:
            parts.append("nesterov")
        if self.weight_decay:
            parts.append(f"wd {self.weight_decay:g}")
        return " ".join(parts)

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
            "betas": list(self.betas),
            "eps": self.eps,
        }


@dataclass(frozen=True)
class Observation:
    """What the attacker sees after a client shares its gradient.

    Attributes:
        model: The model with the weights the client computed its gradient at.
            The attacker knows the architecture and the weights (it sent them).
        gradients: The shared gradient, one tensor per entry of
            `model.named_parameters()`, in that order.
        parameter_names: The names of those parameters, aligned with `gradients`.
        input_shape: Shape of one example, e.g. ``(3, 32, 32)``.
        num_classes: Size of the label space.
        batch_size: How many examples the client's gradient averages over.
        batchnorm: The mode the client ran the model in: "train" (BatchNorm
            normalises with the batch's own statistics, what a client training
            with ``model.train()`` does) or "eval" (with the running statistics
            the server sent: breaching's "public buffers").  Part of the
            protocol, so the attacker knows it.
    """

    model: nn.Module
    gradients: tuple[torch.Tensor, ...]
    parameter_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int = 1
    batchnorm: str = "train"

    def __post_init__(self) -> None:
        _check_batchnorm(self.batchnorm)

    @property
    def device(self) -> torch.device:
        return self.gradients[0].device

    def gradient(self, name: str) -> torch.Tensor:
        """The shared gradient of the parameter called `name`."""
        return self.gradients[self.parameter_names.index(name)]


@dataclass(frozen=True, eq=False)
class UpdateObservation:
    """What the server holds after one FedAvg round of a client.

    The client trained a copy of the global model with its optimiser on its own
    examples and sent back its weights.  The server knows the model and the
    weights it sent, the weights it got back, how many examples the client
    trained on (FedAvg weights clients by it) and the local schedule it told
    the client to run (learning rate, steps or epochs, mini-batch size).  It
    does not know the examples, nor the client's shuffled order of them.

    Attributes:
        model: A copy of the global model as the server sent it.
        sent: The weights sent, ``name -> tensor`` for every entry of
            ``model.state_dict()`` (parameters and buffers, e.g. BatchNorm's
            running statistics).
        returned: The weights the client returned, with the same names.
        update: ``returned - sent`` for each trainable parameter, in the order
            of `parameter_names`: exactly that difference when the client has
            no defense; with one, the defended update, and the returned
            parameters are ``sent + update``.
        parameter_names: The names of the trainable parameters, aligned with
            `update`.
        input_shape: Shape of one example, e.g. ``(3, 32, 32)``.
        num_classes: Size of the label space.
        num_examples: How many examples the client trained on (n).
        local_lr: The clients' learning rate.
        local_steps: Mini-batch steps per round (K), or None when the schedule
            is given in `epochs`.
        epochs: Passes over the client's examples (E), or None when the
            schedule is given in `local_steps`.
        local_batch: Examples per mini-batch (b); None means the whole batch.
        batchnorm: "train" (the client trained in train mode, BatchNorm on each
            mini-batch's statistics, its running statistics updated) or "eval"
            (it trained in eval mode, on the running statistics the server sent,
            which stay as sent).
        optimizer: The client's optimiser (plain SGD by default).
        drop_last: Whether the client drops a short last mini-batch of an epoch
            (a DataLoader's ``drop_last=True``).

    Equality is identity (the fields hold tensors).
    """

    model: nn.Module
    sent: dict[str, torch.Tensor]
    returned: dict[str, torch.Tensor]
    update: tuple[torch.Tensor, ...]
    parameter_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    num_classes: int
    num_examples: int
    local_lr: float
    local_steps: int | None = None
    epochs: int | None = None
    local_batch: int | None = None
    batchnorm: str = "train"
    optimizer: ClientOptimizer = field(default_factory=ClientOptimizer)
    drop_last: bool = False

    def __post_init__(self) -> None:
        _check_batchnorm(self.batchnorm)
        if self.drop_last and self.num_examples < self.batch_size:
            raise ValueError("drop_last with fewer examples than one mini-batch leaves no step")
        if (self.local_steps is None) == (self.epochs is None):
            raise ValueError("an UpdateObservation needs exactly one of local_steps and epochs")
        if len(self.update) != len(self.parameter_names):
            raise ValueError("update and parameter_names must be aligned")

    @property
    def device(self) -> torch.device:
        return self.update[0].device

    @property
    def batch_size(self) -> int:
        """Examples in each full mini-batch (b, or n for the whole batch)."""
        return self.num_examples if self.local_batch is None else self.local_batch

    @property
    def steps_per_epoch(self) -> int:
        """Mini-batches in one pass over the examples: ceil(n / b), floor(n / b) with drop_last."""
        if self.drop_last:
            return self.num_examples // self.batch_size
        return -(-self.num_examples // self.batch_size)

    @property
    def steps(self) -> int:
        """SGD steps the client took in the round (K, or E * ceil(n / b))."""
        if self.local_steps is not None:
            return self.local_steps
        assert self.epochs is not None
        return self.epochs * self.steps_per_epoch

    @property
    def buffer_names(self) -> tuple[str, ...]:
        """Names in `sent` that are not trainable parameters (buffers, frozen weights)."""
        trainable = set(self.parameter_names)
        return tuple(name for name in self.sent if name not in trainable)

    def parameter_update(self, name: str) -> torch.Tensor:
        """The update of the parameter called `name`."""
        return self.update[self.parameter_names.index(name)]


BATCHNORM_MODES = ("train", "eval")


def _check_batchnorm(mode: str) -> None:
    if mode not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm must be 'train' or 'eval', not {mode!r}")


@dataclass(frozen=True)
class Snapshot:
    """The dummy input at one step of the optimisation (on the CPU)."""

    step: int
    inputs: torch.Tensor


@dataclass(frozen=True)
class Reconstruction:
    """What an attack recovered, and what it cost.

    Attributes:
        inputs: Recovered inputs, shape ``(batch_size, *input_shape)``; not clamped.
        labels: Recovered labels, shape ``(batch_size,)``.
        loss_history: Gradient-matching loss after each optimiser step.
        snapshots: Dummy inputs every `snapshot_every` steps, starting at step 0.
        steps: Optimiser steps taken (over all restarts).
        evaluations: Gradient-matching evaluations (forward + double backward).
        restarts: Fresh random starts after the first.
        converged: Whether the matching loss fell below the tolerance.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    loss_history: tuple[float, ...] = ()
    snapshots: tuple[Snapshot, ...] = field(default=(), repr=False)
    steps: int = 0
    evaluations: int = 0
    restarts: int = 0
    converged: bool = False

    @property
    def final_loss(self) -> float:
        return self.loss_history[-1] if self.loss_history else float("nan")
