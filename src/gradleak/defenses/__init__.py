"""Defenses against gradient leakage, applied by the client before it shares.

Python API: transforms compose and plug into `gradleak.threat.observe`::

    from gradleak.defenses import compose, gaussian, prune
    observe(model, x, y, defense=compose(prune(0.3), gaussian(1e-3, seed=0)))

The registry maps a name to a `DefenseSpec`: what its one strength means,
the DLG paper's sweep of it, and how to build a `ClientDefense` at a given
strength and seed (`build_defense`).  `gradleak defend` runs through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from gradleak.defenses.aggregate import aggregate, batch
from gradleak.defenses.base import (
    ClientDefense,
    ClientStep,
    Compose,
    GradientTransform,
    compose,
    identity,
)
from gradleak.defenses.dpsgd import DEFAULT_CLIP, DEFAULT_DELTA, dp_sgd, epsilon
from gradleak.defenses.noise import gaussian, laplacian
from gradleak.defenses.precision import bf16, fp16, int8
from gradleak.defenses.prune import prune
from gradleak.errors import ConfigError

Builder = Callable[[float | None, int], ClientDefense]


@dataclass(frozen=True)
class DefenseSpec:
    """A named defense and its one knob.

    Attributes:
        name: Registry name.
        summary: One line for help texts and reports.
        knob: What the strength means ("" for a defense without one).
        sweep: The strengths `gradleak defend` tries by default (empty
            without a knob).
        build: ``(strength, seed) -> ClientDefense``.
        integer: The strength must be a whole number.
        upper: Largest allowed strength (the lowest is always 0).
        below_upper: `upper` itself is not allowed (pruning everything
            shares an all-zero gradient: there is nothing left to attack).
        log_scale: Plot the strength on a log axis.
    """

    name: str
    summary: str
    knob: str
    sweep: tuple[float, ...]
    build: Builder
    integer: bool = False
    upper: float = math.inf
    log_scale: bool = True
    below_upper: bool = False

    def check(self, strength: float | None) -> float | None:
        """Validate one strength; returns it as stored (a float, or None without a knob)."""
        if not self.knob:
            if strength is not None:
                raise ConfigError(f"defense '{self.name}' takes no strength; drop --strengths")
            return None
        if strength is None or not math.isfinite(strength):
            raise ConfigError(f"defense '{self.name}' needs a finite strength ({self.knob})")
        low = 1 if self.integer else 0
        if strength < low or strength > self.upper:
            bound = (
                f"between {low:g} and {self.upper:g}"
                if math.isfinite(self.upper)
                else (f"{low:g} or more")
            )
            raise ConfigError(
                f"{self.name} strength must be {bound} ({self.knob}), got {strength:g}"
            )
        if self.below_upper and strength == self.upper:
            raise ConfigError(
                f"{self.name} strength must be below {self.upper:g} ({self.knob}): at "
                f"{self.upper:g} the client shares nothing but zeros, so there is nothing to attack"
            )
        if self.integer and strength != int(strength):
            raise ConfigError(f"{self.name} strength must be a whole number ({self.knob})")
        return float(strength)


_NOISE_SWEEP = (1e-4, 1e-3, 1e-2, 1e-1)

DEFENSES: dict[str, DefenseSpec] = {
    spec.name: spec
    for spec in (
        DefenseSpec("none", "no defense: the gradient as computed", "", (),
                    lambda s, seed: ClientDefense("none")),
        DefenseSpec("gaussian", "Gaussian noise on every entry", "noise std", _NOISE_SWEEP,
                    lambda s, seed: ClientDefense("gaussian", s, gaussian(s, seed=seed))),
        DefenseSpec("laplacian", "Laplacian noise on every entry", "noise scale b",
                    _NOISE_SWEEP,
                    lambda s, seed: ClientDefense("laplacian", s, laplacian(s, seed=seed))),
        DefenseSpec("fp16", "half precision round trip", "", (),
                    lambda s, seed: ClientDefense("fp16", None, fp16())),
        DefenseSpec("bf16", "bfloat16 round trip", "", (),
                    lambda s, seed: ClientDefense("bf16", None, bf16())),
        DefenseSpec("int8", "int8 quantisation, one scale per tensor", "", (),
                    lambda s, seed: ClientDefense("int8", None, int8())),
        DefenseSpec("prune", "zero the smallest-magnitude entries of each tensor",
                    "share of each tensor zeroed", (0.1, 0.2, 0.3, 0.5, 0.7),
                    lambda s, seed: ClientDefense("prune", s, prune(s)),
                    upper=1.0, log_scale=False, below_upper=True),
        DefenseSpec("aggregate", "secure aggregation: only the mean of k clients is seen",
                    "clients k", (2, 4, 8), lambda s, seed: aggregate(int(s)), integer=True),
        DefenseSpec("batch", "one client, a batch of B examples", "batch size B", (2, 4, 8),
                    lambda s, seed: batch(int(s)), integer=True),
        DefenseSpec("dpsgd", f"DP-SGD (Opacus): clip each example to norm {DEFAULT_CLIP:g}, "
                    "add noise", "noise multiplier", (1e-3, 1e-2, 1e-1, 1.0),
                    lambda s, seed: ClientDefense("dpsgd", s, step=dp_sgd(s, seed=seed))),
    )
}  # fmt: skip

# `--defense all`: the DLG paper's defenses (batch size appears as aggregation,
# which gives the same gradient), plus DP-SGD.
ALL = ("none", "gaussian", "laplacian", "fp16", "bf16", "int8", "prune", "aggregate", "dpsgd")


def get_defense(name: str) -> DefenseSpec:
    """The registry entry called `name`."""
    key = name.strip().lower()
    if key not in DEFENSES:
        raise ConfigError(f"unknown defense '{name}': choose one of {', '.join(DEFENSES)} or all")
    return DEFENSES[key]


def build_defense(name: str, strength: float | None = None, *, seed: int = 0) -> ClientDefense:
    """Build defense `name` at `strength`, its randomness seeded by `seed`."""
    spec = get_defense(name)
    return spec.build(spec.check(strength), seed)


def parse_strengths(text: str, name: str) -> tuple[float, ...]:
    """Parse ``"a,b,c"`` into strengths valid for defense `name`."""
    spec = get_defense(name)
    values = []
    for part in text.split(","):
        try:
            value = float(part.strip())
        except ValueError:
            raise ConfigError(
                f"--strengths: {part.strip()!r} is not a number; give e.g. 0.001,0.01"
            ) from None
        values.append(spec.check(value))
    return tuple(dict.fromkeys(values))  # in order, without repeats


__all__ = [
    "ALL",
    "DEFAULT_CLIP",
    "DEFAULT_DELTA",
    "DEFENSES",
    "ClientDefense",
    "ClientStep",
    "Compose",
    "DefenseSpec",
    "GradientTransform",
    "aggregate",
    "batch",
    "bf16",
    "build_defense",
    "compose",
    "dp_sgd",
    "epsilon",
    "fp16",
    "gaussian",
    "get_defense",
    "identity",
    "int8",
    "laplacian",
    "parse_strengths",
    "prune",
]
