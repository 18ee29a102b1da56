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

from dataclasses import dataclass, field

import torch
from torch import nn


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

    The client trained a copy of the global model with plain SGD on its own
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
        local_lr: The clients' SGD learning rate.
        local_steps: Mini-batch steps per round (K), or None when the schedule
            is given in `epochs`.
        epochs: Passes over the client's examples (E), or None when the
            schedule is given in `local_steps`.
        local_batch: Examples per mini-batch (b); None means the whole batch.
        batchnorm: "train" (the client trained in train mode, BatchNorm on each
            mini-batch's statistics, its running statistics updated) or "eval"
            (it trained in eval mode, on the running statistics the server sent,
            which stay as sent).

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

    def __post_init__(self) -> None:
        _check_batchnorm(self.batchnorm)
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
        """Mini-batches in one pass over the client's examples: ceil(n / b)."""
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
