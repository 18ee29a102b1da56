"""Inverting Gradients' step-size schedules, its plateau rule and its BatchNorm prior.

Two pieces the paper's attack does not have, kept apart from `inverting.py`
so that they can be tested alone:

* `Plateau`: when to cut the step size and when to stop.  The paper runs a
  fixed 24,000 steps and cuts the step size by 10 after 3/8, 5/8 and 7/8 of
  them ("step", kept as the paper's preset).  gradleak's default instead
  watches the objective: every ``window`` steps it compares the lowest
  objective reached so far with the lowest reached before that window; when
  the window improved it by less than the share ``rtol``, the run has
  plateaued at this step size: it is cut by 10, and after ``decays`` cuts the
  next plateau ends the run.  The lowest value (not the last) is compared
  because signed Adam's objective jumps from step to step by about its step
  size; a plateau is where the lowest value stops falling.
* `BatchNormStatistics`: GradInversion's prior (Yin et al., CVPR 2021): the
  distance between the per-channel mean and (biased) variance of each
  BatchNorm layer's input on the dummy batch and the layer's running
  statistics, which the server sent with the model.  In eval mode it is
  GradInversion's feature-statistics prior.  In train mode it is what pins the
  image's brightness and contrast: BatchNorm right after the first
  convolution normalises each channel by the batch's own mean and spread, so
  the shared gradient is blind (up to the zero padding at the borders) to a
  scale and shift of every input channel, and the first layer's running
  statistics are the one thing the server holds that says what the data's
  scale and shift are.  With the running statistics of a model trained on the
  client's kind of data, the first layer's mean and variance over one image
  are close to those over a training batch; that is an assumption about the
  data, not something the gradient shows.  What the server cannot know: an
  image whose brightness or contrast is far from its data's typical one comes
  back at the typical one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["BatchNormStatistics", "Plateau"]


class Plateau:
    """The plateau rule (module docstring): cut the step size, then stop.

    Feed it the objective after every step (`update`); it answers whether the
    run should stop, and cuts the optimiser's step size itself.
    """

    def __init__(
        self,
        optimiser: torch.optim.Optimizer,
        *,
        window: int,
        rtol: float,
        decays: int,
        factor: float = 0.1,
    ) -> None:
        self.optimiser = optimiser
        self.window = window
        self.rtol = rtol
        self.decays = decays
        self.factor = factor
        self.cuts = 0
        self.best = float("inf")
        self._best_before = float("inf")
        self._seen = 0

    def update(self, value: float) -> bool:
        """Record one step's objective; True when the run has plateaued for good."""
        if value < self.best:  # NaN never counts as progress
            self.best = value
        self._seen += 1
        if self._seen % self.window:
            return False
        before, self._best_before = self._best_before, self.best
        if not before < float("inf"):
            return False  # the first window has nothing to compare with
        if self.best < before - self.rtol * abs(before):
            return False  # still descending
        if self.cuts >= self.decays:
            return True
        self.cuts += 1
        for group in self.optimiser.param_groups:
            group["lr"] *= self.factor
        return False


class BatchNormStatistics:
    """Record each BatchNorm layer's input while active; score it against the running statistics.

    Args:
        module: The model the objective runs (its BatchNorm layers are hooked).
        buffers: The running statistics as sent, by the model's buffer names.
        layers: "first" (the first BatchNorm layer only: the scale and shift of
            the input) or "all" (every layer: GradInversion's prior).
    """

    def __init__(self, module: nn.Module, buffers: dict[str, torch.Tensor], layers: str) -> None:
        self._targets: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._seen: list[torch.Tensor | None] = []
        self._active = False
        self._handles = []
        for name, layer in module.named_modules():
            if not isinstance(layer, nn.modules.batchnorm._BatchNorm):
                continue
            mean, var = buffers.get(f"{name}.running_mean"), buffers.get(f"{name}.running_var")
            if mean is None or var is None:
                continue  # a layer that keeps no running statistics says nothing
            index = len(self._targets)
            self._targets.append((mean.detach(), var.detach()))
            self._seen.append(None)
            self._handles.append(layer.register_forward_pre_hook(self._hook(index)))
            if layers == "first":
                break

    def __len__(self) -> int:
        return len(self._targets)

    def _hook(self, index: int):
        def record(_layer: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if self._active and self._seen[index] is None:  # the first forward of the evaluation
                self._seen[index] = inputs[0]

        return record

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Record the layers' inputs of the first forward run inside this block."""
        self._seen = [None] * len(self._targets)
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def penalty(self) -> torch.Tensor | None:
        """Mean over the recorded layers of `statistics_distance`; None if none was recorded."""
        terms = [
            statistics_distance(seen, mean, var)
            for seen, (mean, var) in zip(self._seen, self._targets, strict=True)
            if seen is not None
        ]
        self._seen = [None] * len(self._targets)
        if not terms:
            return None
        return torch.stack(terms).mean()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def statistics_distance(
    features: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor
) -> torch.Tensor:
    """Mean over channels of ``((mu - m)^2 + (sd - s)^2) / s^2``, over batch and positions.

    ``mu`` and ``sd`` are the mean and (biased: BatchNorm's in train mode)
    standard deviation of ``features`` ``(N, C, ...)``, ``m`` and ``s^2`` the
    running mean and variance: the squared 2-Wasserstein distance between the
    two Gaussians, in units of the running variance, so that one weight fits
    layers and models of any scale.
    """
    dims = [0, *range(2, features.dim())]
    mean = features.mean(dim=dims)
    sd = (features.var(dim=dims, unbiased=False) + _EPS).sqrt()
    rm, rv = running_mean.to(features), running_var.to(features)
    scale = rv + _EPS
    return (((mean - rm) ** 2 + (sd - (rv + _EPS).sqrt()) ** 2) / scale).mean()


_EPS = 1e-5  # BatchNorm's own epsilon: keeps the square root smooth at a constant channel
