"""The victim's side: one client's round of FedSGD or FedAvg, seen from the server.

`observe` runs what an honest client runs (forward its private batch, take the
cross-entropy against one-hot labels, back-propagate) and returns only what
leaves the client: the gradient, next to the model the server sent.  Defenses
act here, on the client, before the gradient is shared: a `defense` transform
changes the finished gradient (noise, precision, pruning), a `step` replaces
how the client computes it (DP-SGD's per-example clipping and noise), and
`observe_aggregate` shows the attacker only the mean of several clients'
gradients (secure aggregation).

`observe_update` is FedAvg's client instead: several local SGD steps on
mini-batches of its examples, after which it returns its weights.

Every entry point first checks the client's batch against the model (a
tensor, floating point of the model's dtype, on its device, finite, of a shape
the model takes, one integer label in range per example) and raises a one-line
`DataError` or `ConfigError` otherwise.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gradleak.defenses.base import ClientStep, GradientTransform
from gradleak.errors import ConfigError, DataError
from gradleak.types import ClientOptimizer, Observation, UpdateObservation

__all__ = [
    "ClientStep",
    "GradientTransform",
    "client_gradients",
    "observe",
    "observe_aggregate",
    "observe_update",
]


def client_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Gradient of the mean cross-entropy of `model` on the batch ``(x, y)``."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x), y)
    return tuple(g.detach() for g in torch.autograd.grad(loss, parameters))


def observe(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    defense: GradientTransform | None = None,
    step: ClientStep | None = None,
    batchnorm: str | None = None,
) -> Observation:
    """Simulate one client step and return what the attacker sees.

    Args:
        model: The global model as the server sent it (not modified).
        x: The client's private batch, shape ``(batch, *input_shape)``; a
            single example without the batch dimension is accepted too.
        y: Its integer labels, shape ``(batch,)`` (or a scalar for one example).
        defense: Optional transform the client applies to its gradient
            before sharing it.
        step: Optional replacement for the plain gradient computation,
            ``step(model, x, y) -> gradients`` (e.g. `gradleak.defenses.dp_sgd`).
        batchnorm: The mode the client runs the model in: "train" (BatchNorm
            on the batch's own statistics, as a client that calls
            ``model.train()``), "eval" (on the running statistics the server
            sent), or None for the mode the model is in.  Recorded in the
            observation: the attacker replays the same mode.

    Returns:
        The shared gradient with the model, input shape and class count.

    Raises:
        DataError: The batch does not fit the model (see the module docstring).
        ConfigError: The batch is on another device than the model.
    """
    return observe_aggregate(model, [(x, y)], defense=defense, step=step, batchnorm=batchnorm)


def observe_aggregate(
    model: nn.Module,
    clients: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    defense: GradientTransform | None = None,
    step: ClientStep | None = None,
    batchnorm: str | None = None,
) -> Observation:
    """Simulate k clients' steps under secure aggregation: the attacker sees their mean.

    Every client computes its gradient on its own batch (with `step` when
    given) and applies `defense` to it, as in `observe`; the aggregation then
    releases only the plain mean of the k shared gradients.

    Args:
        model: The global model, the same for every client (not modified).
        clients: One private batch ``(x, y)`` per client, shaped as for `observe`.
        defense: Transform each client applies to its own gradient.
        step: Replacement for each client's gradient computation.
        batchnorm: The clients' mode, as for `observe`.

    Returns:
        The aggregate; its `batch_size` counts the examples of all clients.

    Raises:
        DataError: A client's batch does not fit the model.
        ConfigError: No clients, or a batch on another device than the model.
    """
    if not clients:
        raise ConfigError("secure aggregation needs at least one client")
    mode = _check_mode(batchnorm, model)
    checked = [_check_batch(model, x, y) for x, y in clients]
    batches = [(x, y) for x, y, _ in checked]
    compute = step if step is not None else client_gradients
    shared = []
    for x, y in batches:
        # A client trains its own copy: in train mode a BatchNorm forward updates the
        # running statistics, which must not leak into the model the server holds.
        own_copy = any(True for _ in model.buffers()) or model.training != (mode == "train")
        client = copy.deepcopy(model).train(mode == "train") if own_copy else model
        gradients = tuple(compute(client, x, y))
        shared.append(tuple(defense(gradients)) if defense is not None else gradients)
    if len(shared) == 1:
        mean = shared[0]  # one client: its gradient, bit for bit
    else:
        mean = tuple(torch.stack(parts).mean(0) for parts in zip(*shared, strict=True))
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    x0 = batches[0][0]
    return Observation(
        model=model,
        gradients=mean,
        parameter_names=tuple(named),
        input_shape=tuple(x0.shape[1:]),
        num_classes=checked[0][2],
        batch_size=sum(int(x.shape[0]) for x, _ in batches),
        batchnorm=mode,
    )


def observe_update(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    local_lr: float,
    local_steps: int | None = None,
    epochs: int | None = None,
    local_batch: int | None = None,
    seed: int,
    defense: GradientTransform | None = None,
    batchnorm: str = "train",
    optimizer: ClientOptimizer | None = None,
    drop_last: bool = False,
) -> UpdateObservation:
    """Simulate one FedAvg client's round and return what the server receives.

    The client trains a deep copy of `model` in train mode with its optimiser
    (plain SGD unless `optimizer` says otherwise: SGD with momentum, Nesterov
    and weight decay, Adam or AdamW, a fresh ``torch.optim`` instance for the
    round) on the mean cross-entropy of mini-batches of its
    n examples, running the model's own forward, so BatchNorm normalises with
    each mini-batch's statistics and updates its running statistics exactly as
    torch does.  It then returns all its weights (parameters and buffers).
    With ``batchnorm="eval"`` it trains in eval mode instead: BatchNorm
    normalises with the running statistics the server sent, which it returns
    unchanged (breaching's "public buffers" setting).

    The mini-batches: each epoch draws a fresh order ``torch.randperm(n,
    generator)`` from one ``torch.Generator`` seeded with `seed` and cuts it
    into consecutive slices of `local_batch` examples, the last slice shorter
    when `local_batch` does not divide n (a DataLoader with ``shuffle=True`` and
    ``drop_last=False``), or left out with `drop_last`.  With `epochs` E the
    client takes the E * ceil(n / b) slices of E epochs (E * floor(n / b) with
    `drop_last`); with `local_steps` K it takes the first K slices of
    that same sequence: consecutive steps take consecutive slices, and a new
    order is drawn when an epoch's order runs out.  When the mini-batch is the
    whole batch (``local_batch`` None or n) the order cannot matter to the mean
    loss, so every step takes the batch as given and nothing is drawn.  The
    order is the client's secret: it is not part of the result.

    A `defense` is applied by the client to what it sends, the final update
    (returned - sent, one tensor per trainable parameter); the returned
    parameters are then the sent ones plus the defended update.  Buffers (e.g.
    BatchNorm's running statistics) are returned as trained: a gradient
    transform's tensors are the parameters'.

    Models with dropout draw their masks from torch's global random generator,
    not from `seed`.

    Args:
        model: The global model as the server sent it (not modified).
        x: The client's private examples, shape ``(n, *input_shape)``; a single
            example without the batch dimension is accepted too.
        y: Their integer labels, shape ``(n,)`` (or a scalar for one example).
        local_lr: The SGD learning rate, finite and above 0.
        local_steps: K, the number of mini-batch steps; give this or `epochs`.
        epochs: E, the number of passes over the n examples; give this or
            `local_steps`.
        local_batch: b, examples per step, 1 to n; None for the whole batch.
        seed: Seeds the generator of the client's shuffled orders.
        defense: Optional transform the client applies to its final update.
        batchnorm: "train" (default) or "eval": the mode the client trains in.
        optimizer: The client's optimiser; None for plain SGD.
        drop_last: Drop each epoch's short last mini-batch.

    Returns:
        The weights sent and returned, the update, and the schedule the server
        configured (`local_lr`, `local_steps` or `epochs`, `local_batch`, the
        optimiser, `drop_last`).

    Raises:
        DataError: The batch does not fit the model.
        ConfigError: An impossible schedule, or a batch on another device.
    """
    local_lr = _check_lr(local_lr)
    mode = _check_mode(batchnorm, model)
    if (local_steps is None) == (epochs is None):
        raise ConfigError(
            "give exactly one of local_steps (K mini-batch steps) and epochs "
            f"(E passes over the examples), got local_steps={local_steps!r} and epochs={epochs!r}"
        )
    if local_steps is not None:
        local_steps = _check_count("local_steps", local_steps)
    if epochs is not None:
        epochs = _check_count("epochs", epochs)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(f"seed must be a whole number, got {seed!r}")

    x, y, num_classes = _check_batch(model, x, y)
    n = int(x.shape[0])
    if local_batch is not None:
        if isinstance(local_batch, bool) or not isinstance(local_batch, numbers.Integral):
            raise ConfigError(f"local_batch must be a whole number or None, got {local_batch!r}")
        if not 1 <= int(local_batch) <= n:
            raise ConfigError(
                f"local_batch must be between 1 and the client's {n} examples, "
                f"got {int(local_batch)}; give a smaller batch or None for the whole batch"
            )
        local_batch = int(local_batch)
    size = n if local_batch is None else local_batch
    if optimizer is None:
        optimizer = ClientOptimizer()
    if not isinstance(optimizer, ClientOptimizer):
        raise ConfigError(
            f"optimizer must be a gradleak.ClientOptimizer, got {type(optimizer).__name__}"
        )
    if drop_last and size > n:
        raise ConfigError(f"drop_last with {n} examples and mini-batches of {size} leaves no step")
    per_epoch = n // size if drop_last else -(-n // size)

    global_model = copy.deepcopy(model)
    sent = {name: t.detach().clone() for name, t in global_model.state_dict().items()}
    names = tuple(name for name, p in global_model.named_parameters() if p.requires_grad)

    client = copy.deepcopy(model).train(mode == "train")
    trainable = [p for p in client.parameters() if p.requires_grad]
    torch_optimizer = optimizer.build(trainable, local_lr)
    generator = torch.Generator().manual_seed(int(seed))
    steps = local_steps if local_steps is not None else int(epochs or 0) * per_epoch
    with torch.enable_grad():
        for indices in _minibatches(n, size, steps, generator, drop_last=drop_last):
            index = indices.to(x.device)
            torch_optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(client(x[index]), y[index]).backward()
            torch_optimizer.step()

    returned = {name: t.detach().clone() for name, t in client.state_dict().items()}
    update = tuple(returned[name] - sent[name] for name in names)
    if defense is not None:
        update = tuple(t.detach() for t in defense(update))
        if len(update) != len(names):
            raise ConfigError(
                f"the defense returned {len(update)} tensors for {len(names)} parameters; "
                "a gradient transform must return one tensor per parameter"
            )
        for name, delta in zip(names, update, strict=True):
            returned[name] = sent[name] + delta
    return UpdateObservation(
        model=global_model,
        sent=sent,
        returned=returned,
        update=update,
        parameter_names=names,
        input_shape=tuple(x.shape[1:]),
        num_classes=num_classes,
        num_examples=n,
        local_lr=local_lr,
        local_steps=local_steps,
        epochs=epochs,
        local_batch=local_batch,
        batchnorm=mode,
        optimizer=optimizer,
        drop_last=bool(drop_last),
    )


def _check_mode(batchnorm: str | None, model: nn.Module) -> str:
    """The client's mode: the one asked for, or the model's own when None."""
    if batchnorm is None:
        return "train" if model.training else "eval"
    if batchnorm not in ("train", "eval"):
        raise ConfigError(f"batchnorm must be 'train' or 'eval', not {batchnorm!r}")
    return batchnorm


def _minibatches(
    n: int, size: int, steps: int, generator: torch.Generator, *, drop_last: bool = False
) -> list[torch.Tensor]:
    """The indices of each step's mini-batch (see `observe_update` for the rule)."""
    batches: list[torch.Tensor] = []
    end = n - n % size if drop_last else n
    while len(batches) < steps:
        # The whole batch: the order cannot matter to the mean loss, so none is drawn.
        order = torch.arange(n) if size >= n else torch.randperm(n, generator=generator)
        batches.extend(order[start : start + size] for start in range(0, end, size))
    return batches[:steps]


def _check_lr(local_lr: float) -> float:
    if isinstance(local_lr, bool) or not isinstance(local_lr, numbers.Real):
        raise ConfigError(f"local_lr must be a number, got {local_lr!r}; give e.g. local_lr=0.01")
    value = float(local_lr)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"local_lr must be finite and above 0, got {value!r}; give e.g. 0.01")
    return value


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ConfigError(f"{name} must be a whole number of at least 1, got {value!r}")
    return int(value)


_CONVERT = {
    torch.float32: ".float()",
    torch.float64: ".double()",
    torch.float16: ".half()",
    torch.bfloat16: ".bfloat16()",
}


def _check_batch(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Check one client's batch against the model and give it a batch dimension.

    Returns:
        The images ``(n, *input_shape)``, the labels ``(n,)`` as int64 on the
        images' device, and the model's class count.
    """
    if not isinstance(x, torch.Tensor):
        kind = f"{type(x).__module__}.{type(x).__qualname__}"
        raise DataError(
            f"the images are a {kind}, not a torch.Tensor; convert them with torch.as_tensor(x)"
        )
    if isinstance(y, numbers.Integral) and not isinstance(y, bool):
        y = torch.tensor(int(y))
    if not isinstance(y, torch.Tensor):
        kind = f"{type(y).__module__}.{type(y).__qualname__}"
        raise DataError(
            f"the labels are a {kind}, not a torch.Tensor; convert them with torch.as_tensor(y)"
        )
    if not x.dtype.is_floating_point:
        raise DataError(
            f"the images are {x.dtype}, not floating point; convert them with .float() "
            "(and scale 0-255 pixels to [0, 1])"
        )
    if y.dtype == torch.bool or y.dtype.is_floating_point or y.dtype.is_complex:
        raise DataError(
            f"the labels are {y.dtype}, not integer class indices; convert them with .long()"
        )
    if y.dim() > 1:
        raise DataError(
            f"the labels have shape {tuple(y.shape)}; give one integer class index per "
            "example, shape (batch,), not one-hot vectors"
        )
    y = y.to(x.device).long()
    if y.dim() == 0:  # one example given without its batch dimension
        x, y = x.unsqueeze(0), y.reshape(1)
    if x.dim() < 2:
        raise DataError(
            f"the images have shape {tuple(x.shape)}; give a batch (batch, *input_shape) "
            "or one example with a scalar label"
        )
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"batch mismatch: {x.shape[0]} images but {y.shape[0]} labels; give one label per image"
        )
    if x.shape[0] == 0:
        raise DataError("the batch is empty; give at least one example")
    weight = next(iter(model.parameters()), None)
    if weight is not None and weight.dtype.is_floating_point:
        if x.dtype != weight.dtype:
            how = _CONVERT.get(weight.dtype, f".to({weight.dtype})")
            raise DataError(
                f"the images are {x.dtype} but the model's weights are {weight.dtype}; "
                f"convert the images with {how}"
            )
        if x.device != weight.device:
            raise ConfigError(
                f"the images are on {x.device} but the model is on {weight.device}; "
                f"move them with .to('{weight.device}')"
            )
    finite = torch.isfinite(x).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        count = int((~torch.isfinite(x)).sum())
        raise DataError(
            f"example {bad} of the batch has NaN or infinite values ({count} in the batch); "
            "replace or drop the examples that have them"
        )
    output = _probe(model, x[:1])
    num_classes = _num_classes(model, output)
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise DataError(
            f"label {bad} is outside the model's {num_classes} classes (0 to {num_classes - 1}); "
            "give labels in that range or build the model with more classes"
        )
    return x, y, num_classes


class _Misfit(Exception):
    """Raised inside the shape probe by the first layer that cannot take its input."""


_CONV_INPUT = {
    1: "(batch, channels, length)",
    2: "(batch, channels, height, width)",
    3: "(batch, channels, depth, height, width)",
}


def _layer_check(name: str) -> Callable[[nn.Module, tuple], None]:
    """A forward pre-hook: does layer `name` get input of a shape it takes?"""

    def hook(module: nn.Module, args: tuple) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        shape = tuple(args[0].shape)
        kind = type(module).__name__
        if isinstance(module, nn.modules.conv._ConvNd):
            dims = len(module.kernel_size)
            if len(shape) != dims + 2:
                expected = _CONV_INPUT.get(dims, f"of {dims + 2} dimensions")
                raise _Misfit(
                    f"its layer '{name}' ({kind}) takes input {expected} but gets shape {shape}"
                )
            if shape[1] != module.in_channels:
                raise _Misfit(
                    f"its layer '{name}' ({kind}) takes {module.in_channels} input channels "
                    f"but gets {shape[1]}"
                )
        elif isinstance(module, nn.Linear) and shape and shape[-1] != module.in_features:
            raise _Misfit(
                f"its layer '{name}' ({kind}) takes {module.in_features} input features "
                f"but gets {shape[-1]}"
            )

    return hook


def _probe(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """Run the model on one example to see that its shape fits; the model is left as it was.

    The forward runs in eval mode (BatchNorm's running statistics untouched),
    without gradients, and each convolution and linear layer first checks the
    shape of what it gets, so that a misfit names its layer.
    """
    modes = [(module, module.training) for module in model.modules()]
    handles = [
        module.register_forward_pre_hook(_layer_check(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear)
    ]
    shape = tuple(example.shape[1:])
    try:
        model.eval()
        with torch.no_grad():
            return model(example)
    except _Misfit as misfit:
        raise DataError(
            f"images of shape {shape} do not fit the model: {misfit}; "
            "give images of the shape the model was built for"
        ) from None
    except RuntimeError as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(
            f"images of shape {shape} do not fit the model: {first}; "
            "give images of the shape the model was built for"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training


def _num_classes(model: nn.Module, output: torch.Tensor) -> int:
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if last_linear:
        return last_linear[-1].out_features
    return int(output.shape[-1])
