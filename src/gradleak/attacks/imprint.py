"""A dishonest server's weights: binning on the first Linear layer (weights only).

Robbing the Fed (Fowl, Geiping, Czaja, Goldblum, Goldstein; ICLR 2022,
https://arxiv.org/abs/2110.13057) adds an "imprint" block, a Linear layer and
a ReLU whose rows all measure one statistic of the input and whose biases sit
at that statistic's quantiles; trap weights (Boenisch et al., EuroS&P 2023)
showed that a server can do the same with the weights alone, in a layer the
architecture already has.  This module does the latter: the server sends the
client's own architecture with crafted weights, and reads examples back from
the gradient.

The crafted weights, for a model whose first layer with weights is a Linear
layer of m units (an MLP on flattened images: ``Flatten -> Linear -> ReLU ->
Linear ...``):

* every row of that layer is the same vector w (w = 1/d: the mean of the
  layer's input, "brightness"), and the biases are ``-c_1 > ... > -c_m`` with
  c_i the i/(m+1) quantiles of ``w . x`` over data of the same domain that the
  server holds (its own public images): unit i fires for an example exactly
  when ``w . x > c_i``;
* every column of the next Linear layer is the same vector, so that each
  example's back-propagated error is the same at every unit it fires:
  ``dL/dz_{n,i} = delta_n`` for all i;
* the rest of the model is left as it was sent.

Then the gradient of row i is ``sum_{n: s_n > c_i} delta_n x_n`` and of bias
i ``sum_{n: s_n > c_i} delta_n``: the difference of neighbouring rows holds
exactly the examples whose statistic falls between c_i and c_{i+1}, and
``(g_W[i] - g_W[i+1]) / (g_b[i] - g_b[i+1])`` is the example itself when it
is alone in that bin (the last bin reads ``g_W[m] / g_b[m]``).  Two examples
in one bin come back as their delta-weighted mean.  With N examples over k
bins of equal mass the expected share alone in a bin is about (1 - 1/k)^(N-1).

The decoder sees only what a server sees: the gradient (or a FedSGD
aggregate of many clients: sums of gradients sum the bins' contents, which
is why the attack works through secure aggregation) and the crafted model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradleak.attacks.passthrough import PassThroughPlan, craft_passthrough, rebuild_passthrough
from gradleak.errors import AttackNotApplicable, ConfigError
from gradleak.types import Observation, Reconstruction

__all__ = [
    "Binning",
    "BinningPlan",
    "ImprintBlock",
    "OutputRows",
    "RowsPlan",
    "dishonest_attack",
    "plan_from_json",
    "plan_to_json",
    "trap_layers",
    "with_imprint",
]


@dataclass(frozen=True)
class BinningPlan:
    """What the server remembers of the weights it crafted: which layer, which bins."""

    layer: str
    thresholds: tuple[float, ...]
    input_shape: tuple[int, ...]
    front: PassThroughPlan | None = None  # convolutions below the trap, set to pass through


def _linears(model: nn.Module) -> list[str]:
    """The model's Linear layers, by name, in definition order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def trap_layers(model: nn.Module) -> tuple[str, str]:
    """The first Linear layer (the trap) and the next one (its error equaliser), by name.

    Convolutions below the trap are set to pass the input through (`attacks/passthrough.py`).

    Raises:
        AttackNotApplicable: The model has fewer than two Linear layers, or the trap has no bias.
    """
    linears = _linears(model)
    if len(linears) < 2:
        raise AttackNotApplicable(
            f"binning needs two Linear layers (a trap and one above it); this model has "
            f"{len(linears)} (`gradleak attack --threat trap` uses its output layer instead)"
        )
    trap = model.get_submodule(linears[0])
    if trap.bias is None:
        raise AttackNotApplicable(f"the trap layer '{linears[0]}' has no bias to set the bins")
    return linears[0], linears[1]


def dishonest_attack(model: nn.Module, bins: int | None = None) -> Binning | OutputRows:
    """The weight-only attack this architecture allows: binning with two Linear layers, the
    output layer's rows with one.

    Raises:
        AttackNotApplicable: The model has no Linear layer.
    """
    linears = _linears(model)
    if not linears:
        raise AttackNotApplicable("a weight-only trap needs a Linear layer; this model has none")
    return Binning(bins=bins) if len(linears) >= 2 else OutputRows()


class Binning:
    """Robbing the Fed's binning on an existing first Linear layer (weights only).

    ``craft(model, public)`` returns the crafted copy of `model` (the weights a
    dishonest server sends) and the `BinningPlan`; ``decode(observation,
    plan)`` reads the examples back from the shared gradient.

    Args:
        bins: Units of the trap layer to use (None: all of them).
        empty: A bin whose error mass is below this share of the largest (unit 0's,
            every example's) is empty: noise, not an example.
    """

    name = "binning"

    def __init__(self, bins: int | None = None, *, empty: float = 1e-4) -> None:
        if bins is not None and bins < 2:
            raise ConfigError(f"binning needs at least 2 bins, got {bins}")
        self.bins = bins
        self.empty = empty

    def craft(self, model: nn.Module, public: torch.Tensor) -> tuple[nn.Module, BinningPlan]:
        """The crafted weights for `model`, with bins at the quantiles of `public` data.

        Args:
            model: The clients' architecture, as the server would otherwise send it.
            public: Examples of the clients' input domain the server holds,
                ``(n, *input_shape)``, as the model takes them (a model that
                normalises its input does so itself).
        """
        trap_name, next_name = trap_layers(model)
        crafted = copy.deepcopy(model)
        trap: nn.Linear = crafted.get_submodule(trap_name)
        following: nn.Linear = crafted.get_submodule(next_name)
        front = craft_passthrough(crafted, trap, public)
        units = trap.out_features if self.bins is None else min(self.bins, trap.out_features)
        features = self._features(crafted, trap, public)
        statistic = features.mean(dim=1)  # w = 1/d: the mean of the layer's input
        quantiles = torch.linspace(0, 1, units + 2, dtype=torch.float64)[1:-1]
        thresholds = torch.quantile(statistic.double(), quantiles)
        with torch.no_grad():
            trap.weight.zero_()
            trap.bias.fill_(-1e4)  # units past `bins` never fire
            trap.weight[:units] = 1.0 / trap.in_features
            trap.bias[:units] = -thresholds.to(trap.bias)
            column = following.weight[:, :1].clone()
            following.weight.copy_(column.expand_as(following.weight))
        plan = BinningPlan(
            trap_name, tuple(float(t) for t in thresholds), tuple(public.shape[1:]), front
        )
        return crafted.train(), plan  # clients train in train mode

    @staticmethod
    def _features(model: nn.Module, trap: nn.Linear, public: torch.Tensor) -> torch.Tensor:
        """What the trap layer receives for the public examples (its input, flattened)."""
        seen: list[torch.Tensor] = []
        handle = trap.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
        try:
            with torch.no_grad():
                model.eval()(public)
        finally:
            handle.remove()
        return seen[0].reshape(len(public), -1)

    def decode(self, observation: Observation, plan: BinningPlan) -> Reconstruction:
        """The examples alone in their bins, read from the trap layer's gradient.

        Returns:
            One reconstruction per bin that holds anything (its delta-weighted
            mean when it holds several), as the trap layer's input reshaped to
            the input shape; labels are not read here (-1).
        """
        g_weight = observation.gradient(f"{plan.layer}.weight").double()
        g_bias = observation.gradient(f"{plan.layer}.bias").double()
        units = len(plan.thresholds)
        g_weight, g_bias = g_weight[:units], g_bias[:units]
        # Bin i holds the examples that fire unit i but not unit i + 1.
        upper_w = torch.cat([g_weight[1:], torch.zeros_like(g_weight[:1])])
        upper_b = torch.cat([g_bias[1:], torch.zeros_like(g_bias[:1])])
        rows, mass = g_weight - upper_w, g_bias - upper_b
        # A bin is empty when its mass is rounding (or, through SecAgg+, quantisation) noise.
        scale = float(g_bias.abs().max()) or 1.0
        occupied = mass.abs() > self.empty * scale
        if not bool(occupied.any()):
            raise AttackNotApplicable("no bin of the trap layer holds an example")
        inputs = _images(rows[occupied] / mass[occupied, None], plan.front, observation)
        return Reconstruction(
            inputs=inputs.reshape(-1, *plan.input_shape).to(observation.gradients[0].dtype),
            labels=torch.full((len(inputs),), -1, dtype=torch.long),
            converged=True,
        )


def _images(
    features: torch.Tensor, front: PassThroughPlan | None, observation: Observation
) -> torch.Tensor:
    """Trap-layer inputs as images: through the pass-through decoder when there is one."""
    return features if front is None else front.decode(features, observation.batchnorm)


@dataclass(frozen=True)
class RowsPlan:
    """The output layer the server zeroed, and how its input maps back to an image."""

    layer: str
    input_shape: tuple[int, ...]
    front: PassThroughPlan | None = None


class OutputRows:
    """A dishonest server's weights for a model with a single Linear layer (its output).

    With one Linear layer there is nothing to bin with; what is left is the output
    layer's own structure, as in iDLG (Zhao, Mopuri, Bilen, 2020,
    https://arxiv.org/abs/2001.02610): for cross-entropy, the gradient of class j's row
    is ``sum_n (p_nj - y_nj) h_n`` and of its bias ``sum_n (p_nj - y_nj)``.  The server
    sends that layer all zero, so ``p_nj = 1/K`` for every example whatever its
    features; a class absent from the batch then gives ``sum_n h_n / K`` and ``N / K``,
    and every other class j gives back the sum and count of its examples' features:
    their mean, exactly the example's features when it is alone in its class.
    Convolutions below are set to pass the input through (`attacks/passthrough.py`).
    Needs at least one class absent from the batch (else the rows are off by a shared
    vector); with K classes and N examples about ``(1 - 1/K)^(N-1)`` of them are alone
    in their class.  Sums of gradients sum the classes, so it reads a secure aggregate
    too; a FedAvg update of several local steps moves the output layer off zero after the
    first, and the rows blur (on LeNet, CIFAR-100, 8 images: 8 exact after one step at lr
    0.01, 3 after four).

    Args:
        empty: A class whose count is below this share of the batch holds no example.
    """

    name = "output-rows"

    def __init__(self, *, empty: float = 1e-4) -> None:
        self.empty = empty

    def craft(self, model: nn.Module, public: torch.Tensor) -> tuple[nn.Module, RowsPlan]:
        """The crafted weights for `model`: pass-through below, a zero output layer."""
        linears = _linears(model)
        if len(linears) != 1:
            raise AttackNotApplicable(
                f"the output-layer attack needs exactly one Linear layer, got {len(linears)}"
            )
        crafted = copy.deepcopy(model)
        layer: nn.Linear = crafted.get_submodule(linears[0])
        if layer.bias is None:
            raise AttackNotApplicable(f"the output layer '{linears[0]}' has no bias")
        front = craft_passthrough(crafted, layer, public)
        with torch.no_grad():
            layer.weight.zero_()
            layer.bias.zero_()
        return crafted.train(), RowsPlan(linears[0], tuple(public.shape[1:]), front)

    def decode(self, observation: Observation, plan: RowsPlan) -> Reconstruction:
        """One reconstruction per class present (its examples' mean), labelled with it."""
        g_weight = observation.gradient(f"{plan.layer}.weight").double()
        g_bias = observation.gradient(f"{plan.layer}.bias").double()
        share = 1.0 / len(g_bias)  # every class's probability under the zero layer
        absent = int(g_bias.argmax())  # an absent class has the largest bias gradient
        total_w, total = g_weight[absent] / share, float(g_bias[absent]) / share
        mass = share * total - g_bias
        rows = share * total_w - g_weight
        present = mass > self.empty * abs(total)
        present[absent] = False
        if not bool(present.any()):
            raise AttackNotApplicable("no class of the output layer holds an example")
        inputs = _images(rows[present] / mass[present, None], plan.front, observation)
        return Reconstruction(
            inputs=inputs.reshape(-1, *plan.input_shape).to(observation.gradients[0].dtype),
            labels=torch.nonzero(present).squeeze(1),
            converged=True,
        )


class ImprintBlock(nn.Module):
    """Robbing the Fed's imprint module: the layers a server adds in front of the model.

    ``Flatten -> Linear(d, bins) -> ReLU -> Linear(bins, d) -> Unflatten``: where the
    framework ships the architecture, the server can insert it, and `Binning` crafts it
    like any first Linear layer (the second Linear is its error equaliser), so every
    example alone in a bin comes back exactly at full resolution, whatever the model
    behind it.  Fowl et al., ICLR 2022, https://arxiv.org/abs/2110.13057.

    Args:
        input_shape: Shape of one example.
        bins: Units of the imprint layer.
        generator: Source of randomness for the init of the layers (explicit seeds).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        bins: int,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        features = int(torch.tensor(input_shape).prod())
        self.flatten = nn.Flatten()
        self.imprint = nn.Linear(features, bins)
        self.mix = nn.Linear(bins, features)
        self.unflatten = nn.Unflatten(1, tuple(input_shape))
        with torch.no_grad():
            for layer in (self.imprint, self.mix):
                bound = layer.in_features**-0.5
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unflatten(self.mix(torch.relu(self.imprint(self.flatten(x)))))


def with_imprint(
    model: nn.Module, input_shape: tuple[int, ...], bins: int, *, seed: int = 0
) -> nn.Module:
    """`model` behind an imprint block (the architecture a server that ships it may send)."""
    generator = torch.Generator().manual_seed(seed)
    return nn.Sequential(ImprintBlock(input_shape, bins, generator=generator), model)


def plan_to_json(plan: BinningPlan | RowsPlan) -> dict[str, Any]:
    """The plan as a capture header keeps it: JSON only (never pickle); the pass-through
    front's maps are not stored, `plan_from_json` derives them from the weights sent."""
    value: dict[str, Any] = {
        "attack": Binning.name if isinstance(plan, BinningPlan) else OutputRows.name,
        "layer": plan.layer,
        "input_shape": list(plan.input_shape),
        "front": None if plan.front is None else plan.front.to_json(),
    }
    if isinstance(plan, BinningPlan):
        value["thresholds"] = list(plan.thresholds)
    return value


def plan_from_json(
    value: dict[str, Any], crafted: nn.Module
) -> tuple[Binning | OutputRows, BinningPlan | RowsPlan]:
    """The decoder and its plan from a header's JSON (`plan_to_json`) and the crafted model
    the server sent (as the capture recorded it).

    Raises:
        AttackNotApplicable: The plan does not fit the weights: no such layer, or a front
            that does not carry the input through them.
    """
    layer, linears = str(value["layer"]), _linears(crafted)
    if value["attack"] == OutputRows.name and linears != [layer]:
        raise AttackNotApplicable(f"the output rows need '{layer}' as the only Linear layer")
    if value["attack"] == Binning.name and (
        linears[:1] != [layer]
        or len(linears) < 2
        or len(value["thresholds"]) > crafted.get_submodule(layer).out_features
    ):
        raise AttackNotApplicable(
            f"binning needs '{layer}' as the first of two Linear layers, with a unit per bin"
        )
    shape = tuple(int(v) for v in value["input_shape"])
    spec = value.get("front")
    front = None if spec is None else rebuild_passthrough(crafted, layer, spec, shape)
    if value["attack"] == OutputRows.name:
        return OutputRows(), RowsPlan(layer, shape, front)
    thresholds = tuple(float(t) for t in value["thresholds"])
    return Binning(), BinningPlan(layer, thresholds, shape, front)
