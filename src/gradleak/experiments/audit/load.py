"""From a capture to what the attacker has: one `Target` per client and round.

A node's round in the capture (`integrations.reader.Exchange`) holds the
weights sent, the weights returned, the config sent and the example count.
The server knows the model, so it rebuilds it, loads the weights it sent and
reads the reply as

* one local step on the whole batch: ``-(returned - sent) / lr`` is the
  client's gradient (an `Observation`);
* several steps (or epochs, or mini-batches): the update with the local
  schedule the server configured (an `UpdateObservation`).

When every reply of a round carries the same arrays (SecAgg+: the server is
handed only the aggregate), the round is one target: the aggregate of its N
clients, a batch of all their examples.

Everything read is checked first: arrays must fit the model (names and
shapes, or the model's order for arrays named "0", "1", ...), be finite, and
the schedule must be in the config.  A target that fails is one `DataError`
line naming the sidecar; the other targets are unaffected.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from gradleak.errors import ConfigError, DataError
from gradleak.integrations.capture import PRIVATE_FOLDER, ModelInfo, Records
from gradleak.integrations.reader import Capture, Exchange, inside, load_arrays
from gradleak.models import build_model
from gradleak.models.user import Normalization, build_user_model, fingerprint, normalize_input
from gradleak.types import ClientOptimizer, Observation, UpdateObservation

# Flower's DP wrappers send the clipping norm to the clients under this key
# (flwr.supercore.differential_privacy.KEY_CLIPPING_NORM).
CLIPPING_KEY = "clipping_norm"
# An update whose norm is within this share of the clipping norm was clipped to it.
CLIPPED_WITHIN = 1e-4


@dataclass(frozen=True)
class Item:
    """One attack target as planned from the sidecars: small and picklable.

    Attributes:
        key: ``round-0001/node-<id>``, or ``round-0001/aggregate``.
        round: The server round.
        node_ids: The node (one) or the nodes whose replies were one aggregate.
        sidecars: Their sidecars, relative to the capture folder.
    """

    key: str
    round: int
    node_ids: tuple[int, ...]
    sidecars: tuple[str, ...]

    @property
    def aggregate(self) -> bool:
        return len(self.node_ids) > 1


@dataclass(frozen=True, eq=False)
class Target:
    """What the server holds of one client (or one aggregate), ready to attack."""

    item: Item
    observation: Observation | UpdateObservation
    lr: float
    local_steps: int | None
    epochs: int | None
    local_batch: int | None
    num_examples: int
    clipping_norm: float | None
    update_norm: float
    truth: tuple[torch.Tensor, torch.Tensor] | None

    @property
    def shared(self) -> str:
        if self.item.aggregate:
            return "aggregate"
        return "update" if isinstance(self.observation, UpdateObservation) else "gradient"

    @property
    def clipped(self) -> bool:
        norm = self.clipping_norm
        return norm is not None and abs(self.update_norm - norm) <= CLIPPED_WITHIN * norm


@dataclass(frozen=True)
class ClientSchedule:
    """What the server's operator knows of the clients' training beyond the train config.

    A Flower app sends some of its schedule in the train config (Flower's
    quickstart sends only ``lr``) and keeps the rest in its run config
    (``local-epochs``, ``batch-size`` in ``pyproject.toml``), which the
    operator wrote.  A value the train config sent wins over these; a value
    neither gives is one line naming the key.

    Attributes:
        lr: The local learning rate.
        local_steps: Mini-batch steps per round.
        epochs: Passes over the client's examples per round.
        batch_size: Examples per mini-batch.
        optimizer: The client's optimiser (never in a train config).
        drop_last: Whether the client's loader drops a short last mini-batch.
        source: Where these came from, for the report ("--local-epochs ...",
            "pyproject.toml").
    """

    lr: float | None = None
    local_steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: ClientOptimizer = ClientOptimizer()
    drop_last: bool = False
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "lr": self.lr, "local_steps": self.local_steps, "epochs": self.epochs,
            "batch_size": self.batch_size, "optimizer": self.optimizer.to_json(),
            "drop_last": self.drop_last, "source": self.source,
        }  # fmt: skip


def build_from_info(info: ModelInfo, *, seed: int = 0) -> nn.Module:
    """The clients' model as `info` describes it, normalising its input where they do.

    A user model is built from its import path (which the caller has checked
    is the one its user gave) and must match the recorded fingerprint.

    Raises:
        ConfigError: The model does not import, or its architecture is not the
            one the capture recorded.
    """
    if info.user_model:
        model = build_user_model(info.name, info.model_args, seed=seed)
        if info.fingerprint is not None and fingerprint(model) != info.fingerprint:
            raise ConfigError(
                f"--model {info.name} builds another architecture than the clients trained "
                f"(fingerprint {fingerprint(model)[:19]}... against the capture's "
                f"{info.fingerprint[:19]}...): give the model class the app used, with its "
                "arguments (--model-arg)"
            )
    else:
        model = build_model(
            info.name,
            input_shape=info.input_shape,
            num_classes=info.num_classes,
            width=info.width,
            seed=seed,
        )
    if info.normalize is not None:
        normalize_input(model, Normalization(tuple(info.normalize["mean"]),
                                             tuple(info.normalize["std"])))  # fmt: skip
    return model


def plan_items(exchanges: list[Exchange]) -> tuple[list[Item], list[str]]:
    """The targets: one per replying node and round, or one per round of identical replies.

    Returns:
        The items, and one note per node that sent no arrays back (an error
        reply or none): facts about the run, not problems of the capture.
    """
    by_round: dict[int, list[Exchange]] = defaultdict(list)
    notes: list[str] = []
    for exchange in exchanges:
        if exchange.reply is None:
            notes.append(f"round {exchange.round} node {exchange.node_id}: {exchange.error}")
        else:
            by_round[exchange.round].append(exchange)
    items: list[Item] = []
    for round_, replies in sorted(by_round.items()):
        digests = {e.reply.sha256 for e in replies if e.reply is not None}
        if len(replies) > 1 and len(digests) == 1:
            items.append(
                Item(
                    f"round-{round_:04d}/aggregate",
                    round_,
                    tuple(e.node_id for e in replies),
                    tuple(e.sidecar for e in replies),
                )
            )
            continue
        for e in replies:
            items.append(
                Item(f"round-{round_:04d}/node-{e.node_id}", round_, (e.node_id,), (e.sidecar,))
            )
    return items, notes


def load_target(
    capture: Capture,
    exchanges: dict[str, Exchange],
    item: Item,
    model_info: ModelInfo,
    *,
    with_truth: bool = True,
    schedule: ClientSchedule | None = None,
) -> Target:
    """Read and check everything `item` needs; build its observation.

    Raises:
        DataError: A file is missing, changed or cut off, arrays do not fit the
            model or are not finite, or the config lacks the schedule.
    """
    parts = [exchanges[s] for s in item.sidecars]
    first = parts[0]
    where = first.sidecar if not item.aggregate else f"round {item.round} (aggregate)"
    model = build_from_info(model_info)
    sent = _fit(model, load_arrays(capture, first.sent, f"{first.sidecar} (sent)"), first.sidecar)
    assert first.reply is not None
    returned = _fit(
        model, load_arrays(capture, first.reply, f"{first.sidecar} (reply)"), first.sidecar
    )
    model.load_state_dict(sent, strict=True)
    model.train()  # a Flower client trains in train mode
    known = schedule or ClientSchedule()
    lr, steps, epochs, batch = _schedule(capture, first, known)
    counts = [e.num_examples for e in parts]
    if any(c is None or c < 1 for c in counts):
        raise DataError(
            f"{where}: the reply names no example count ('num-examples'); "
            "the audit needs it to read the update"
        )
    num_examples = int(sum(c for c in counts if c is not None))
    names = tuple(name for name, p in model.named_parameters() if p.requires_grad)
    update = tuple(returned[name].double() - sent[name].double() for name in names)
    norm = math.sqrt(sum(float((u**2).sum()) for u in update))
    if norm == 0.0:
        raise DataError(f"{where}: the returned weights equal the sent ones; nothing to audit")
    own = int(first.num_examples or 0)  # one client's examples: what its schedule runs over
    whole_batch = batch is None or batch >= own
    drop_last = known.drop_last and not whole_batch
    size = own if whole_batch else int(batch or own)
    per_epoch = own // size if drop_last else -(-own // size)
    total_steps = steps if steps is not None else (epochs or 0) * per_epoch
    if total_steps < 1:
        raise DataError(
            f"{where}: {own} examples in mini-batches of {size} with drop_last leave no step"
        )
    if total_steps == 1 and whole_batch and known.optimizer.plain:
        # One step on the whole batch (or the example-weighted mean of such steps, an
        # aggregate): -update / lr is the gradient of the mean loss over all its examples.
        observation: Observation | UpdateObservation = Observation(
            model=model,
            gradients=tuple(-u / lr for u in update),
            parameter_names=names,
            input_shape=model_info.input_shape,
            num_classes=model_info.num_classes,
            batch_size=num_examples,
            batchnorm="train",  # a Flower client trains with model.train()
        )
    else:
        # An aggregate of several clients' updates is read as one client over all their
        # examples taking one client's number of steps: right for the label counts (the
        # update is the example-weighted mean of the clients'), a model of it for images.
        aggregate = item.aggregate
        observation = UpdateObservation(
            model=model,
            sent={k: v.clone() for k, v in sent.items()},
            returned=returned,
            update=tuple(u.float() for u in update),
            parameter_names=names,
            input_shape=model_info.input_shape,
            num_classes=model_info.num_classes,
            num_examples=num_examples,
            local_lr=lr,
            local_steps=total_steps if aggregate else steps,
            epochs=None if aggregate else epochs,
            local_batch=None if whole_batch or aggregate else batch,
            batchnorm="train",
            optimizer=known.optimizer,
            drop_last=drop_last and not aggregate,
        )
    truth = _truth(capture, parts, model_info, num_examples) if with_truth else None
    clipping = _number(_config_value(first, CLIPPING_KEY))
    return Target(item, observation, lr, steps, epochs, batch, num_examples, clipping, norm, truth)


def _truth(
    capture: Capture, parts: list[Exchange], info: ModelInfo, num_examples: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The demo's private batches of these nodes, or None where the capture has none."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    files = [f"{PRIVATE_FOLDER}/round-{e.round:04d}/node-{e.node_id}.safetensors" for e in parts]
    if not (capture.folder / PRIVATE_FOLDER).is_dir():
        return None
    images, labels = [], []
    for exchange, file in zip(parts, files, strict=True):
        path = inside(capture.folder, file, f"the private batch of node {exchange.node_id}")
        try:
            tensors = load(path.read_bytes())
        except (SafetensorError, OSError, ValueError) as error:
            raise DataError(f"{file} is not a readable safetensors file ({error})") from None
        x, y = tensors.get("images"), tensors.get("labels")
        if x is None or y is None or x.dim() != 4 or tuple(x.shape[1:]) != info.input_shape:
            raise DataError(f"{file} does not hold images of shape {info.input_shape} and labels")
        if y.shape != (x.shape[0],) or int(y.min()) < 0 or int(y.max()) >= info.num_classes:
            raise DataError(f"{file}: its labels do not fit the images and the model's classes")
        images.append(x.float())
        labels.append(y.long())
    x, y = torch.cat(images), torch.cat(labels)
    if len(y) != num_examples:
        raise DataError(
            f"{files[0]}: the private batches hold {len(y)} images, the replies say {num_examples}"
        )
    return x, y


def _fit(model: nn.Module, records: Records, where: str) -> dict[str, torch.Tensor]:
    """The one array record that fits the model's state_dict, as tensors; else a DataError."""
    expected = model.state_dict()
    reasons = []
    for record, arrays in records.items():
        names = list(arrays)
        if names == [str(i) for i in range(len(names))] and len(names) == len(expected):
            arrays = dict(zip(expected, arrays.values(), strict=True))  # Flower's positional names
        reason = _misfit(expected, arrays)
        if reason is None:
            tensors = {
                name: torch.from_numpy(np.array(arrays[name])).reshape(expected[name].shape)
                for name in expected
            }
            bad = next(
                (
                    n
                    for n, t in tensors.items()
                    if t.is_floating_point() and not torch.isfinite(t).all()
                ),
                None,
            )
            if bad is not None:
                raise DataError(f"{where}: the array '{bad}' has NaN or infinite values")
            return {n: t.to(expected[n].dtype) for n, t in tensors.items()}
        reasons.append(f"record '{record}': {reason}")
    detail = "; ".join(reasons) if reasons else "no arrays"
    raise DataError(
        f"{where}: the arrays do not fit the model ({detail}); check --model and the capture"
    )


def _misfit(expected: dict[str, torch.Tensor], arrays: dict[str, Any]) -> str | None:
    missing = [n for n in expected if n not in arrays]
    if missing:
        return f"no array '{missing[0]}' ({len(missing)} of {len(expected)} missing)"
    extra = [n for n in arrays if n not in expected]
    if extra:
        return f"an array '{extra[0]}' the model does not have"
    for name, tensor in expected.items():
        shape = tuple(np.shape(arrays[name]))
        # A scalar (BatchNorm's num_batches_tracked) comes back from a client as one element.
        if shape != tuple(tensor.shape) and not (tensor.dim() == 0 and shape == (1,)):
            return f"'{name}' has shape {shape}, the model {tuple(tensor.shape)}"
    return None


def _schedule(
    capture: Capture, exchange: Exchange, known: ClientSchedule
) -> tuple[float, int | None, int | None, int | None]:
    """The local schedule: the train config sent, else what the operator said (`known`)."""
    keys = capture.schedule
    lr = _number(_config_value(exchange, keys.lr))
    if lr is None:
        lr = known.lr
    if lr is None or not math.isfinite(lr) or lr <= 0:
        raise DataError(
            f"{exchange.sidecar}: the train config sent has no positive learning rate under "
            f"'{keys.lr}'; give it with --lr (or --flwr-app APP), or tell LeakageAudit the key "
            "(schedule_keys=ScheduleKeys(lr=...))"
        )
    steps = _count(exchange, keys.local_steps)
    epochs = _count(exchange, keys.epochs)
    if steps is None and epochs is None:
        steps, epochs = known.local_steps, known.epochs
    if (steps is None) == (epochs is None):
        raise DataError(
            f"{exchange.sidecar}: the train config sent gives neither '{keys.local_steps}' nor "
            f"'{keys.epochs}' (or both); give --local-epochs N or --local-steps K "
            "(or --flwr-app APP to read the app's run config)"
        )
    batch = _count(exchange, keys.batch_size)
    if batch is None:
        batch = known.batch_size
    return lr, steps, epochs, batch


def _config_value(exchange: Exchange, key: str) -> Any:
    for record in exchange.config.values():
        if key in record:
            return record[key]
    return None


def _count(exchange: Exchange, key: str) -> int | None:
    value = _config_value(exchange, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(
            f"{exchange.sidecar}: '{key}' in the config sent must be a whole number 1 or more"
        )
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
