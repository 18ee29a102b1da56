"""The gradient-matching objective of many victims at once.

Each victim has its own model weights, shared gradient, label and dummy.  Three
paths compute every victim's loss and its gradient in the dummy at once:

- **explicit** (explicit.py) for plain nets such as the papers' LeNets: both
  derivatives written out, convolutions grouped over the victims, linear
  layers through their outer-product structure (lowrank.py).  The default
  wherever it applies.
- **stacked autograd** (layered.py) for the plain nets explicit.py does not
  write out: every victim's weights stacked on a leading axis, autograd twice.
- **vmapped**: one victim's objective (replay the client step on the dummy,
  squared distance to the shared gradient) written with torch.func and
  `vmap`-ed over the victims.  The general path and the reference the others
  are tested against.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vmap

from gradleak.attacks.explicit import ExplicitMatching, plain_blocks
from gradleak.attacks.layered import plain_layers, stacked_matching, unfolded_size
from gradleak.attacks.matching import soft_label_cross_entropy
from gradleak.errors import AttackNotApplicable
from gradleak.types import Observation

# The stacked autograd path evaluates in groups of victims whose unfolded
# patches (victims x examples x `unfolded_size`) stay within this many
# entries: small groups stay in cache.  Measured on the 2-core CPU, one
# thread, per MNIST LeNet victim: 0.73 ms in groups of 24-32, 1.0 ms in one
# group of 64, 0.83 ms vmapped at 64.  One stride-free CIFAR LeNet example
# (691k entries) is no faster stacked than vmapped, hence the cap per example.
STACKED_BUDGET = 1_000_000
STACKED_PER_EXAMPLE = 200_000
PATHS = ("explicit", "stacked", "vmapped")


class BatchedObjective:
    """Loss and gradient of V independent gradient-matching problems.

    The variable of victim v is one flat vector: its dummy input, followed by
    its dummy label logits when the labels are learned (DLG), the same order
    ``torch.optim.LBFGS`` flattens ``[inputs, label_logits]`` in.

    Args:
        observations: One single-example observation per victim, all of the
            same architecture (the weights and gradients differ).
        labels: Known labels, shape ``(V,)``, or None to learn them.
        learned: Rows that learn their labels although `labels` is given
            (their entries there are ignored): DLG's rows in a batch shared
            with iDLG's.  Their variable ends with label logits; the other
            rows' variables are padded to the same size with entries that
            get no gradient.  The explicit path only.
        dtype: The precision to compute in.
        as_published: Learned labels through the published soft-label
            expression (`soft_label_cross_entropy`): faithful mode.
    """

    def __init__(
        self,
        observations: Sequence[Observation],
        labels: torch.Tensor | None,
        dtype: torch.dtype,
        *,
        as_published: bool = False,
        learned: torch.Tensor | None = None,
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
        if labels is None or (learned is not None and not bool(learned.any())):
            learned = None
        self._all_learned = learned  # None: every row alike
        self.learns_labels = labels is None or learned is not None
        self.as_published = as_published
        label_size = self.batch_size * self.num_classes if self.learns_labels else 0
        self.size = self.input_size + label_size
        self.device = first.device
        self.dtype = dtype
        self.output_dtype = first.gradients[0].dtype  # the client's precision
        self._observations = list(observations)
        self._all_labels = labels
        self._count = len(observations)
        norms: dict[int, torch.Tensor] = {}  # a victim attacked twice is summed once
        for o in observations:
            if id(o) not in norms:
                norms[id(o)] = _squared_norm(o.gradients)
        self._all_norms = torch.stack([norms[id(o)] for o in observations]).to(dtype)
        self._layers = plain_layers(first.model, self.input_shape)
        blocks = plain_blocks(self._layers) if self._layers is not None else None
        self._blocks = blocks
        self._unfolded = None  # entries per victim, where the stacked path applies
        if self._layers is not None:
            params = dict(first.model.named_parameters())
            per_example = unfolded_size(self._layers, params, self.input_shape)
            if per_example <= STACKED_PER_EXAMPLE:
                self._unfolded = self.batch_size * per_example
        if blocks is not None:
            self.path = "explicit"
        elif self._unfolded is not None:
            self.path = "stacked"
        else:
            self.path = "vmapped"
        if learned is not None and blocks is None:
            raise AttackNotApplicable("rows of several attacks need a plain net (explicit.py)")
        self._explicit_all: ExplicitMatching | None = None
        self._stacked_all: tuple[dict, dict] | None = None
        self.select(torch.arange(len(observations), device=self.device))

    def use(self, path: str) -> None:
        """Evaluate with `path` ("explicit", "stacked" or "vmapped"; tests and benchmarks)."""
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, not {path!r}")
        if path != "explicit" and self._all_learned is not None:
            raise AttackNotApplicable("rows of several attacks need the explicit objective")
        if path == "explicit" and self._blocks is None:
            raise AttackNotApplicable("the explicit objective needs a plain net it writes out")
        if path == "stacked" and self._layers is None:
            raise AttackNotApplicable("the stacked objective needs a plain net")
        self.path = path
        self.select(self._rows)

    def select(self, victims: torch.Tensor) -> None:
        """Restrict evaluation to these victims (finished ones leave the work)."""
        self._rows = victims
        everyone = len(victims) == self._count and bool(
            (victims == torch.arange(self._count, device=victims.device)).all()
        )
        self._norms = self._all_norms[victims]
        labels = self._all_labels
        self._labels = labels[victims] if labels is not None else victims  # placeholder for vmap
        learned = self._all_learned
        self._learned = learned[victims] if learned is not None else None
        if self.path == "explicit":
            if self._explicit_all is None:  # built once; LFW's weights are not copied
                self._explicit_all = ExplicitMatching(
                    self._blocks,  # type: ignore[arg-type]
                    self._observations,
                    self.dtype,
                    as_published=self.as_published,
                )
            self._explicit = self._explicit_all if everyone else self._explicit_all.select(victims)
            return
        params, targets = self._stacked()
        if everyone:
            self._params, self._targets = params, targets
        else:
            self._params = {n: p[victims] for n, p in params.items()}
            self._targets = {n: t[victims] for n, t in targets.items()}

    def _stacked(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Every victim's weights and shared gradients stacked, for the autograd paths."""
        if self._stacked_all is None:
            names = list(self._observations[0].parameter_names)
            params = {
                n: torch.stack(
                    [dict(o.model.named_parameters())[n].detach() for o in self._observations]
                ).to(self.dtype)
                for n in names
            }
            targets = {
                n: torch.stack([o.gradients[k] for o in self._observations]).to(self.dtype)
                for k, n in enumerate(names)
            }
            self._stacked_all = (params, targets)
            # A weightless copy: functional_call substitutes each victim's weights.
            self._skeleton = copy.deepcopy(self._observations[0].model).to("meta")
            self._function = vmap(grad_and_value(self._one, argnums=2))
        return self._stacked_all

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses ``(V,)`` and their gradients ``(V, size)`` at the points ``z``."""
        if self.path == "explicit":
            if self._all_labels is None:
                return self._explicit(z, None)
            return self._explicit(z, self._labels, self._learned)
        if self.path == "stacked":
            return self._stacked_path(z)
        with torch.enable_grad():
            gradient, loss = self._function(self._params, self._targets, z, self._labels)
        return loss.detach(), gradient.detach()

    def _stacked_path(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
            parts.append(
                stacked_matching(
                    self._layers,
                    params,
                    targets,
                    z[rows],
                    None if labels is None else labels[rows],
                    batch_size=self.batch_size,
                    input_shape=self.input_shape,
                    as_published=self.as_published,
                )  # fmt: skip
            )
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def squared_norms(self) -> torch.Tensor:
        """``||shared gradient||^2`` of every selected victim."""
        return self._norms

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
                    logits,
                    z[self.input_size :].reshape(self.batch_size, -1),
                    as_published=self.as_published,
                )
            return F.cross_entropy(logits, label.reshape(-1))

        dummy = grad(client_loss)(params)
        return sum(((dummy[n] - targets[n]) ** 2).sum() for n in dummy)


def _squared_norm(gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum |g|^2`` in float64, a slice at a time (no float64 copy of LFW's 4.4M entries)."""
    parts = (part for g in gradients for part in g.detach().flatten().split(1 << 16))
    return sum(part.to(torch.float64).pow(2).sum() for part in parts)  # type: ignore[return-value]
