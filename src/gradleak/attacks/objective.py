"""The gradient-matching objective of many victims at once, with torch.func.

Each victim has its own model weights, shared gradient, label and dummy.  The
per-victim objective (replay the client step on the dummy, squared distance to
the shared gradient) is written for one victim and `vmap`-ed over all of them,
so one call evaluates every victim's loss and its gradient in the dummy as a
single vectorised computation.  That is the general path and the reference.
For a plain conv net (the papers' LeNet) the same objective is computed
without vmap, with every victim's weights stacked on a leading axis: with
both derivatives written out (explicit.py) where the layout allows, else
with autograd (layered.py).  Both cost far less per victim than the vmapped
call, most of all when few victims are left.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vmap

from gradleak.attacks.explicit import explicit_matching, plain_blocks
from gradleak.attacks.layered import plain_layers, stacked_matching, unfolded_size
from gradleak.attacks.matching import soft_label_cross_entropy
from gradleak.errors import AttackNotApplicable
from gradleak.types import Observation

# A plain net is evaluated without vmap, in groups of victims whose unfolded
# patches (victims x examples x `unfolded_size`) stay within this many
# entries: small groups stay in cache.  Measured on the 2-core CPU, one
# thread, per MNIST LeNet victim with autograd: 0.73 ms in groups of 24-32,
# 1.0 ms in one group of 64, 0.83 ms vmapped at 64 (and far more vmapped at
# a few); written out (explicit.py), 1.3-1.6x less than autograd side by side.
# One stride-free CIFAR LeNet example (691k entries) is no faster written
# out than vmapped, hence the cap per example.
STACKED_BUDGET = 1_000_000
STACKED_PER_EXAMPLE = 200_000


class BatchedObjective:
    """Loss and gradient of V independent gradient-matching problems.

    The variable of victim v is one flat vector: its dummy input, followed by
    its dummy label logits when the labels are learned (DLG), the same order
    ``torch.optim.LBFGS`` flattens ``[inputs, label_logits]`` in.

    Args:
        observations: One single-example observation per victim, all of the
            same architecture (the weights and gradients differ).
        labels: Known labels, shape ``(V,)``, or None to learn them.
        dtype: The precision to compute in.
    """

    def __init__(
        self,
        observations: Sequence[Observation],
        labels: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> None:
        first = observations[0]
        if any(o.batch_size != first.batch_size for o in observations):
            raise AttackNotApplicable("the batched engine needs victims of one batch size")
        if any(True for _ in first.model.buffers()):
            raise AttackNotApplicable(
                "the batched engine needs a model without buffers (no BatchNorm); "
                "use the sequential engine"
            )
        self.input_shape = tuple(first.input_shape)
        self.num_classes = first.num_classes
        self.batch_size = first.batch_size
        self.input_size = self.batch_size * math.prod(self.input_shape)
        self.learns_labels = labels is None
        label_size = self.batch_size * self.num_classes if self.learns_labels else 0
        self.size = self.input_size + label_size
        self.device = first.device
        names = list(first.parameter_names)
        # A weightless copy: functional_call substitutes each victim's weights.
        self._skeleton = copy.deepcopy(first.model).to("meta")
        self._all_params = {
            n: torch.stack([dict(o.model.named_parameters())[n].detach() for o in observations]).to(
                dtype
            )
            for n in names
        }
        self._all_targets = {
            n: torch.stack([o.gradients[k] for o in observations]).to(dtype)
            for k, n in enumerate(names)
        }
        self._all_labels = labels
        self._count = len(observations)
        self._function = vmap(grad_and_value(self._one, argnums=2))
        self._layers = plain_layers(first.model, self.input_shape)
        self._blocks = plain_blocks(self._layers) if self._layers is not None else None
        self._unfolded = None  # entries per victim, where the stacked path applies
        if self._layers is not None:
            per_example = unfolded_size(self._layers, self._all_params, self.input_shape)
            if per_example <= STACKED_PER_EXAMPLE:
                self._unfolded = self.batch_size * per_example
        self.select(torch.arange(len(observations), device=self.device))

    def select(self, victims: torch.Tensor) -> None:
        """Restrict evaluation to these victims (finished ones leave the work)."""
        everyone = len(victims) == self._count and bool(
            (victims == torch.arange(self._count, device=victims.device)).all()
        )
        if everyone:  # no copies: a 5,749-class last layer is gigabytes per chunk
            self._params, self._targets = self._all_params, self._all_targets
        else:
            self._params = {n: p[victims] for n, p in self._all_params.items()}
            self._targets = {n: t[victims] for n, t in self._all_targets.items()}
        labels = self._all_labels
        self._labels = labels[victims] if labels is not None else victims  # placeholder for vmap

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses ``(V,)`` and their gradients ``(V, size)`` at the points ``z``."""
        if self._unfolded is not None:
            return self._stacked(z)
        with torch.enable_grad():
            gradient, loss = self._function(self._params, self._targets, z, self._labels)
        return loss.detach(), gradient.detach()

    def _stacked(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked path, in near-equal groups of victims that fit STACKED_BUDGET."""
        assert self._layers is not None and self._unfolded is not None
        groups = -(-len(z) // max(1, STACKED_BUDGET // self._unfolded))
        labels = None if self.learns_labels else self._labels
        parts = []
        bounds = [len(z) * k // groups for k in range(groups + 1)]
        for lo, hi in itertools.pairwise(bounds):
            rows = slice(lo, hi)  # views, not copies, of the stacked weights
            params = {n: p[rows] for n, p in self._params.items()}
            targets = {n: t[rows] for n, t in self._targets.items()}
            matching = stacked_matching if self._blocks is None else explicit_matching
            parts.append(
                matching(
                    self._layers if self._blocks is None else self._blocks,  # type: ignore[arg-type]
                    params,
                    targets,
                    z[rows],
                    None if labels is None else labels[rows],
                    batch_size=self.batch_size,
                    input_shape=self.input_shape,
                )  # fmt: skip
            )
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def squared_norms(self) -> torch.Tensor:
        """``||shared gradient||^2`` of every selected victim."""
        return sum(t.flatten(1).pow(2).sum(1) for t in self._targets.values())

    def _one(
        self,
        params: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        z: torch.Tensor,
        label: torch.Tensor,
    ) -> torch.Tensor:
        x = z[: self.input_size].reshape(self.batch_size, *self.input_shape)

        def client_loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = functional_call(self._skeleton, p, (x,))
            if self.learns_labels:
                return soft_label_cross_entropy(
                    logits, z[self.input_size :].reshape(self.batch_size, -1)
                )
            return F.cross_entropy(logits, label.reshape(-1))

        dummy = grad(client_loss)(params)
        return sum(((dummy[n] - targets[n]) ** 2).sum() for n in dummy)
