"""Inverting Gradients on many victims at once: one stacked optimisation, vmapped objective.

`InvertingGradients` attacks one observation.  A sweep attacks many that
share everything but their data: the architecture, the batch size, the
client's schedule and BatchNorm mode (and often the weights: one trained
model per table cell).  `attack_victims` runs them as one computation:

* The objective (cosine distance between the dummy's and the observed
  gradient or update, plus total variation) is written once for one victim
  with `torch.func` (`functional_call`, `grad` for the client's gradient,
  the client's local SGD unrolled for an update) and vectorised over the
  victims with `vmap`.  Weights that every victim shares are passed once,
  unbatched, so the convolutions see one weight and a bigger batch;
  otherwise each victim's weights are stacked.
* Adam, the sign, the step-size schedule and the box are elementwise, so one
  `torch.optim.Adam` over the stacked dummies is every victim's own Adam,
  step for step; each victim draws its start from its own seed exactly as
  the sequential attack does, and restarts keep each victim's best trial.

So every victim follows the sequential attack's algorithm; only float
rounding differs (a vmapped convolution adds in another order), and the
signed step turns a rounding difference in a near-zero component of the
objective's gradient into a full step, so long float32 trajectories may
part.  ``tests/test_inverting_engine.py`` holds the first steps to the
sequential attack in float64.

In train mode BatchNorm normalises with the batch's own statistics and
never reads its running statistics, and only the trainable parameters'
update is matched, so the replay drops the running statistics (a client's
forward would update them; no matched quantity depends on them).  In eval
mode they are read, as sent, and never written.

Measured speed against the sequential attack: `bench/ig_engine.py`,
BENCHMARKS.md.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from gradleak.attacks.dlg import require_nonzero_gradient
from gradleak.attacks.inverting import (
    InvertingGradients,
    _check_labels,
    _pseudo_observation,
    attacker_batches,
    cosine_distance,
    total_variation,
)
from gradleak.attacks.threads import attack_threads
from gradleak.attacks.unroll import FunctionalOptimizer
from gradleak.errors import ConfigError
from gradleak.types import (
    ClientOptimizer,
    Observation,
    Reconstruction,
    Snapshot,
    UpdateObservation,
)

__all__ = ["attack_victims"]

Tensors = dict[str, torch.Tensor]


def attack_victims(
    attack: InvertingGradients,
    observations: Sequence[Observation | UpdateObservation],
    *,
    seeds: Sequence[int],
    labels: Sequence[torch.Tensor] | None = None,
) -> list[Reconstruction]:
    """Attack several observations of one setting as one computation.

    Args:
        attack: The configured attack (its config is every victim's).
        observations: FedSGD gradients or FedAvg updates, all of one kind, one
            architecture, one batch size, one schedule, one BatchNorm mode.
        seeds: Each victim's seed, as the sequential attack's ``seed``.
        labels: Each victim's known labels, or None to infer them.

    Returns:
        One `Reconstruction` per observation, in order, as the sequential
        attack returns it.

    Raises:
        ConfigError: The observations differ in anything but their data and
            weights, or the seeds or labels do not match them in number.
        AttackNotApplicable: A victim's gradient or update is all zeros, or
            no label rule applies to it.
    """
    if not observations:
        return []
    if len(seeds) != len(observations):
        raise ConfigError(f"give one seed per victim: {len(observations)} victims, {len(seeds)}")
    if labels is not None and len(labels) != len(observations):
        raise ConfigError(
            f"give labels for every victim or none: {len(labels)} of {len(observations)}"
        )
    first = observations[0]
    _check_alike(observations)
    config = attack.config
    batch = first.num_examples if isinstance(first, UpdateObservation) else first.batch_size
    priors = (config.feature_prior > 0 and batch > 1) or (
        config.bn_prior > 0 and first.batchnorm == "train"
    )
    if config.schedule != "step" or priors or not config.signed:
        raise ConfigError(
            "the batched engine runs the paper's schedule only (signed Adam, a fixed step "
            "count, no BatchNorm prior): configure schedule='step', bn_prior=0, signed=True "
            "(IGConfig.paper), or attack the victims one by one"
        )
    device, dtype = first.device, config.torch_dtype
    update = isinstance(first, UpdateObservation)
    count = first.num_examples if update else first.batch_size
    for obs in observations:
        if isinstance(obs, UpdateObservation):
            require_nonzero_gradient(
                _pseudo_observation(obs),
                hint="the client's weights did not move, so its examples left no trace",
            )
        else:
            require_nonzero_gradient(obs)
    with attack_threads(device):
        if labels is not None:
            ys = [_check_labels(y, count, first.num_classes).to(device) for y in labels]
        elif config.labels == "given":
            raise ConfigError(
                "this attack is configured with labels='given' but none were passed; "
                "pass labels= or configure labels='infer'"
            )
        else:
            ys = [attack.infer_labels(obs).to(device).long() for obs in observations]
        problem = _Problem(observations, dtype, device)
        y = torch.stack(ys)
        steps = _StepFunctions(problem, config.tv_scale, update, first)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        shape = (count, *first.input_shape)
        histories: list[list[float]] = [[] for _ in observations]
        best: list[tuple[float, torch.Tensor, list[Snapshot]] | None] = [None] * len(observations)
        for _ in range(config.restarts + 1):
            finals, x, snapshots = _trial(steps, y, shape, config, generators, device, histories)
            for v, loss in enumerate(finals):
                kept = best[v]
                if kept is None or _better(loss, kept[0]):
                    best[v] = (loss, x[v].detach().clone(), snapshots[v])
        results = []
        for v, obs in enumerate(observations):
            kept = best[v]
            assert kept is not None
            loss, inputs, snapshots = kept
            shared = obs.update if isinstance(obs, UpdateObservation) else obs.gradients
            results.append(
                Reconstruction(
                    inputs=inputs.to(shared[0].dtype),
                    labels=ys[v].detach().reshape(-1),
                    loss_history=tuple(histories[v]),
                    snapshots=tuple(snapshots),
                    steps=config.iterations * (config.restarts + 1),
                    evaluations=(config.iterations + 1) * (config.restarts + 1),
                    restarts=config.restarts,
                    converged=math.isfinite(loss) and loss < config.tolerance,
                )
            )
        return results


def _check_alike(observations: Sequence[Observation | UpdateObservation]) -> None:
    """Refuse a mix: the stacked computation needs one setting for every victim."""

    def setting(obs: Observation | UpdateObservation) -> tuple:
        shapes = tuple((n, tuple(p.shape)) for n, p in obs.model.named_parameters())
        common = (type(obs).__name__, type(obs.model).__name__, shapes, obs.parameter_names,
                  obs.input_shape, obs.num_classes, obs.batchnorm)  # fmt: skip
        if isinstance(obs, UpdateObservation):
            return (
                *common, obs.num_examples, obs.steps, obs.batch_size, obs.local_lr,
                obs.optimizer, obs.drop_last,
            )  # fmt: skip
        return (*common, obs.batch_size)

    reference = setting(observations[0])
    for index, obs in enumerate(observations[1:], start=1):
        if setting(obs) != reference:
            raise ConfigError(
                f"victim {index} differs from victim 0 in its model, batch size, schedule or "
                "BatchNorm mode; attack victims of one setting together"
            )


class _Problem:
    """The victims' weights (shared or stacked), buffers and observed tensors."""

    def __init__(
        self,
        observations: Sequence[Observation | UpdateObservation],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        first = observations[0]
        self.train = first.batchnorm == "train"
        self.names = first.parameter_names
        self.module = _replay_module(first.model, train=self.train)
        keep = set(dict(self.module.named_parameters())) | set(dict(self.module.named_buffers()))
        states = [_state(obs) for obs in observations]
        self.weights: Tensors = {}
        self.weights_stacked = not all(_same(states[0], s) for s in states[1:])
        for name in states[0]:
            if name not in keep:
                continue  # running statistics the train-mode replay does not read
            tensors = [s[name].detach().to(device) for s in states]
            tensors = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
            self.weights[name] = torch.stack(tensors) if self.weights_stacked else tensors[0]
        self.trainable = tuple(n for n in self.names)
        shared = [
            obs.update if isinstance(obs, UpdateObservation) else obs.gradients
            for obs in observations
        ]
        self.observed = tuple(
            torch.stack([s[i].detach().to(device, dtype) for s in shared])
            for i in range(len(self.names))
        )


def _replay_module(model: nn.Module, *, train: bool) -> nn.Module:
    module = copy.deepcopy(model).train(train)
    if train:
        for layer in module.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.track_running_stats = False
                layer.running_mean = None
                layer.running_var = None
                layer.num_batches_tracked = None
    return module


def _state(obs: Observation | UpdateObservation) -> Tensors:
    if isinstance(obs, UpdateObservation):
        return dict(obs.sent)
    state = dict(obs.model.named_parameters())
    state.update(obs.model.named_buffers())
    return state


def _same(a: Tensors, b: Tensors) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _StepFunctions:
    """The vmapped objective: its gradient in the dummies, and the matching loss alone."""

    def __init__(
        self,
        problem: _Problem,
        tv_scale: float,
        update: bool,
        first: Observation | UpdateObservation,
    ) -> None:
        module, names = problem.module, problem.names
        weights_dim = 0 if problem.weights_stacked else None
        if isinstance(first, UpdateObservation):
            lr, client_optimizer = first.local_lr, first.optimizer
            batches = attacker_batches(
                first.num_examples, first.batch_size, first.steps, drop_last=first.drop_last
            )
        else:
            lr, batches, client_optimizer = 0.0, [], ClientOptimizer()

        def loss(trainable: Tensors, fixed: Tensors, x: torch.Tensor, y: torch.Tensor):
            return F.cross_entropy(functional_call(module, {**fixed, **trainable}, (x,)), y)

        def produce(weights: Tensors, x: torch.Tensor, y: torch.Tensor) -> tuple:
            trainable = {n: weights[n] for n in names}
            fixed = {n: t for n, t in weights.items() if n not in trainable}
            if not update:
                gradient = grad(loss)(trainable, fixed, x, y)
                return tuple(gradient[n] for n in names)
            current = dict(trainable)
            stepper = FunctionalOptimizer(client_optimizer, lr)
            for indices in batches:
                index = indices.to(x.device)
                gradient = grad(loss)(current, fixed, x[index], y[index])
                current = stepper.step(current, gradient)
            return tuple(current[n] - trainable[n] for n in names)

        def objective(x, weights, y, observed):
            matching = cosine_distance(produce(weights, x, y), observed)
            return matching + tv_scale * total_variation(x), matching

        def matching_only(x, weights, y, observed):
            return cosine_distance(produce(weights, x, y), observed)

        dims = (0, weights_dim, 0, 0)
        self._step = vmap(grad(objective, has_aux=True), in_dims=dims)
        self._matching = vmap(matching_only, in_dims=dims)
        self._problem = problem

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective's gradient in each victim's dummies, and each victim's matching loss."""
        p = self._problem
        return self._step(x, p.weights, y, p.observed)

    def matching(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self._problem
        with torch.no_grad():
            return self._matching(x, p.weights, y, p.observed)


def _trial(
    steps: _StepFunctions,
    y: torch.Tensor,
    shape: tuple[int, ...],
    config,
    generators: Sequence[torch.Generator],
    device: torch.device,
    histories: list[list[float]],
) -> tuple[list[float], torch.Tensor, list[list[Snapshot]]]:
    """One trial for every victim, as `inverting._trial` runs it for one."""
    starts = [config.initial_inputs(shape, g) for g in generators]  # each from its own seed
    x = torch.stack(starts).to(device, config.torch_dtype).requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimiser, milestones=list(config.milestones), gamma=0.1
    )
    snapshots = [[Snapshot(0, x[v].detach().cpu().clone())] for v in range(len(generators))]
    for step in range(1, config.iterations + 1):
        gradient, matching = steps.gradient(x.detach(), y)
        x.grad = gradient.sign()
        optimiser.step()
        scheduler.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
        for history, value in zip(histories, matching.tolist(), strict=True):
            history.append(value)
        if step % config.snapshot_every == 0:
            for v in range(len(generators)):
                snapshots[v].append(Snapshot(step, x[v].detach().cpu().clone()))
    finals = steps.matching(x.detach(), y).tolist()
    for history, value in zip(histories, finals, strict=True):
        history.append(value)
    return finals, x.detach(), snapshots


def _better(loss: float, than: float) -> bool:
    if not math.isfinite(than):
        return True
    return math.isfinite(loss) and loss < than
