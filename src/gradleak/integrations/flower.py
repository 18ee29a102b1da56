"""The curious server of a Flower run: record what every client sends, change nothing.

`LeakageAudit` wraps any strategy of Flower's Message API
(`flwr.serverapp.strategy.Strategy`), the way Flower's own
DifferentialPrivacy wrappers do::

    from gradleak.integrations.flower import LeakageAudit

    strategy = FedAvg(...)                                  # or any strategy, DP-wrapped or not
    strategy = LeakageAudit(strategy, out="captures", model="lenet",
                            input_shape=(1, 28, 28), num_classes=10)
    strategy.start(grid=grid, initial_arrays=arrays, train_config=ConfigRecord({"lr": 0.01, ...}))

and `gradleak audit captures --out report` attacks what it recorded.

For every round it records, per node, the arrays and config records the
wrapped strategy's `configure_train` sends, and every reply of
`aggregate_train` (arrays, metric and config records, `num-examples`, error),
matched by round and node id (a reply's source node is the node the
instruction went to).  It records the replies *before* handing them on,
because Flower's server-side DP wrappers clip the replies' arrays in place:
make LeakageAudit the outermost wrapper, or it sees what the wrappers
inside it left.  It returns the wrapped strategy's messages and aggregate
unchanged (the same objects); evaluation passes straight through.

`LegacyLeakageAudit` does the same for the legacy stack
(`flwr.server.strategy.Strategy`, `configure_fit`/`aggregate_fit`), the only
one with SecAgg+ in Flower 1.42: under SecAgg+ every reply it is handed
carries the aggregate, and the capture shows exactly that.

What the audit needs to know, besides what is recorded: the model (a
gradleak registry name, the input shape and class count, the width where it
has one), and which train-config keys hold the local learning rate and steps
or epochs (`ScheduleKeys`, default "lr", "local-steps", "local-epochs",
"batch-size").  Arrays must be sent as the model's ``state_dict`` (names
equal, or in its order as Flower's ``ArrayRecord(list_of_arrays)`` and the
legacy ``Parameters`` name them "0", "1", ...).

Nothing is pickled: arrays go to safetensors files, the rest to JSON
sidecars with each file's sha256 (`capture.py`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from gradleak.errors import ConfigError
from gradleak.integrations import missing_flower
from gradleak.integrations.capture import CaptureWriter, ModelInfo, Records, ScheduleKeys
from gradleak.integrations.guard import GuardSettings, inspect_weights


def require_flower() -> Any:
    """Import flwr, or say in one line which extra provides it.

    Raises:
        ConfigError: Flower is not installed.
    """
    try:
        import flwr
    except ImportError:
        raise missing_flower() from None
    return flwr


require_flower()

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord  # noqa: E402
from flwr.common import parameters_to_ndarrays  # noqa: E402
from flwr.server.strategy import Strategy as LegacyStrategy  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import Strategy  # noqa: E402

log = logging.getLogger(__name__)

__all__ = [
    "LeakageAudit",
    "LegacyLeakageAudit",
    "ModelGuard",
    "ModelInfo",
    "ScheduleKeys",
    "require_flower",
]


def _writer(
    strategy: object,
    out: str | os.PathLike[str],
    model: ModelLike,
    input_shape: tuple[int, int, int] | None,
    num_classes: int | None,
    width: int | None,
    schedule_keys: ScheduleKeys | None,
    stack: str,
    weighted_by: str,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    malicious: dict[str, Any] | None = None,
    text_model: dict[str, Any] | None = None,
) -> CaptureWriter:
    import flwr

    import gradleak

    model = model_info(model, input_shape, num_classes, width, normalize)
    return CaptureWriter(
        out,
        model=model,
        schedule=schedule_keys or ScheduleKeys(),
        stack=stack,
        strategy=f"{type(strategy).__module__}.{type(strategy).__qualname__}",
        weighted_by=weighted_by,
        versions={"flwr": flwr.__version__, "gradleak": gradleak.__version__},
        malicious=malicious,
        text_model=text_model,
    )


ModelLike = Any  # a registry name, a ModelInfo, the user's nn.Module, or a function making one


def model_info(
    model: ModelLike,
    input_shape: tuple[int, int, int] | None,
    num_classes: int | None,
    width: int | None,
    normalize: tuple[Sequence[float], Sequence[float]] | None,
) -> ModelInfo | None:
    """What the capture records of the clients' model.

    The user's own model (an ``nn.Module`` or a function returning one) is
    recorded by its class's import path and its fingerprint; the audit later
    builds it from the path its user gives and checks the fingerprint.

    Raises:
        ConfigError: A registry name without its shape and classes, a
            normalisation that does not fit, or a model of another kind.
    """
    from torch import nn

    from gradleak.models.user import (
        Normalization,
        fingerprint,
        import_path,
        infer_input_shape,
        num_classes_of,
    )

    norm = None
    if normalize is not None:
        mean, std = (v if isinstance(v, Sequence) else (v,) for v in normalize)
        norm = Normalization(tuple(float(v) for v in mean), tuple(float(v) for v in std))
    if model is None or isinstance(model, ModelInfo):
        if norm is not None:
            if model is None:
                raise ConfigError("normalize goes with a model")
            model = dataclasses.replace(model, normalize=norm.to_json())
        return model
    if isinstance(model, str):
        if input_shape is None or num_classes is None:
            raise ConfigError("give input_shape and num_classes with the model name")
        return ModelInfo(
            model, tuple(input_shape), int(num_classes), width, None,
            None if norm is None else norm.to_json(),
        )  # fmt: skip
    if not isinstance(model, nn.Module) and callable(model):
        model = model()
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be a gradleak model name, a ModelInfo or your nn.Module, not "
            f"{type(model).__name__}"
        )
    shape = tuple(input_shape) if input_shape is not None else infer_input_shape(model)
    if norm is not None and len(norm.mean) == 1 and shape[0] > 1:
        norm = Normalization(norm.mean * shape[0], norm.std * shape[0])
    return ModelInfo(
        import_path(model), shape, num_classes or num_classes_of(model, shape), None,
        fingerprint(model), None if norm is None else norm.to_json(),
    )  # fmt: skip


class LeakageAudit(Strategy):
    """Wrap a Message-API strategy and record what the server sends and receives.

    Args:
        strategy: The strategy to wrap (FedAvg, a DP wrapper around it, ...).
        out: The capture folder (new or empty).
        model: The clients' model: your own ``nn.Module`` (or a function
            returning one; recorded by import path and fingerprint, its input
            shape read from it unless given), a gradleak registry name with
            `input_shape` and `num_classes` (and `width`), or a `ModelInfo`;
            None to name it later on `gradleak audit`'s command line.
        input_shape: ``(channels, height, width)`` of one example.
        num_classes: Number of classes.
        width: Base width of "convnet" or "resnet18".
        schedule_keys: Which train-config keys hold the local schedule.
        on_round: Called with the round number once its replies are recorded
            (a progress bar, say).
        normalize: ``(mean, std)`` per channel (or one of each) of the clients'
            input normalisation, e.g. ``((0.5,) * 3, (0.5,) * 3)``.
        text_model: For LoRA fine-tuning of a gradleak built-in language model
            (``TextModelSpec.to_json()``), instead of `model`: `gradleak audit`
            then rebuilds the clients' sentences with the span attack.

    Raises:
        ConfigError: `out` holds a capture already or cannot be written; a bad model spec.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        out: str | os.PathLike[str],
        model: ModelLike = None,
        input_shape: tuple[int, int, int] | None = None,
        num_classes: int | None = None,
        width: int | None = None,
        schedule_keys: ScheduleKeys | None = None,
        on_round: Callable[[int], None] | None = None,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
        malicious: dict[str, Any] | None = None,
        text_model: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.on_round = on_round
        weighted_by = str(getattr(strategy, "weighted_by_key", "num-examples"))
        self.writer = _writer(
            strategy, out, model, input_shape, num_classes, width, schedule_keys, "message",
            weighted_by, normalize, malicious, text_model,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"LeakageAudit({self.strategy!r}, out={str(self.writer.folder)!r})"

    def summary(self) -> None:
        log.info("LeakageAudit: recording every train round to %s", self.writer.folder)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        stored: dict[int, dict[str, Any]] = {}  # FedAvg sends one RecordDict to every node
        for message in messages:
            content = message.content
            key = id(content)  # alive as long as `messages`: ids cannot be reused here
            if key not in stored:
                arrays_sent = _message_arrays(content.array_records)
                stored[key] = self.writer.store_sent(server_round, arrays_sent)
            self.writer.record_sent(
                server_round,
                message.metadata.dst_node_id,
                stored[key],
                {name: dict(record) for name, record in content.config_records.items()},
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        # Before delegating: server-side DP clipping rewrites the replies' arrays in place.
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.writer.record_reply(
                    server_round, node, None, metrics={}, configs={}, error=_error(reply)
                )
                continue
            content = reply.content
            self.writer.record_reply(
                server_round,
                node,
                _message_arrays(content.array_records),
                metrics={name: dict(r) for name, r in content.metric_records.items()},
                configs={name: dict(r) for name, r in content.config_records.items()},
            )
        self.writer.finish_round(server_round)
        if self.on_round is not None:
            self.on_round(server_round)
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def _message_arrays(array_records: Any) -> Records:
    # Array.numpy() decodes the message's bytes (np.load, allow_pickle=False); nothing is changed.
    return {
        name: {key: np.asarray(array.numpy()) for key, array in record.items()}
        for name, record in array_records.items()
    }


def _error(reply: Message) -> str:
    error = reply.error
    return f"the client replied with an error (code {error.code}): {error.reason}"


class LegacyLeakageAudit(LegacyStrategy):
    """`LeakageAudit` for Flower's legacy strategies (``configure_fit``/``aggregate_fit``).

    Wrap the strategy a `LegacyContext` runs, e.g. with `SecAggPlusWorkflow`.
    Arrays are recorded as the record "parameters" with names "0", "1", ...
    (the order of the model's ``state_dict``).  Same arguments as `LeakageAudit`.
    """

    def __init__(
        self,
        strategy: Any,
        *,
        out: str | os.PathLike[str],
        model: ModelLike = None,
        input_shape: tuple[int, int, int] | None = None,
        num_classes: int | None = None,
        width: int | None = None,
        schedule_keys: ScheduleKeys | None = None,
        on_round: Callable[[int], None] | None = None,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
        malicious: dict[str, Any] | None = None,
    ) -> None:
        self.strategy = strategy
        self.on_round = on_round
        self.writer = _writer(
            strategy, out, model, input_shape, num_classes, width, schedule_keys, "legacy",
            "num-examples", normalize, malicious,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"LegacyLeakageAudit({self.strategy!r}, out={str(self.writer.folder)!r})"

    def initialize_parameters(self, client_manager: Any) -> Any:
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        stored: dict[int, dict[str, Any]] = {}
        for proxy, fitins in instructions:
            key = id(fitins.parameters)
            if key not in stored:
                arrays = {"parameters": _numbered(parameters_to_ndarrays(fitins.parameters))}
                stored[key] = self.writer.store_sent(server_round, arrays)
            self.writer.record_sent(
                server_round, _node(proxy), stored[key], {"config": dict(fitins.config)}
            )
        return instructions

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        for proxy, fitres in results:
            arrays = _numbered(parameters_to_ndarrays(fitres.parameters))
            self.writer.record_reply(
                server_round,
                _node(proxy),
                {"parameters": arrays},
                metrics={"metrics": {**fitres.metrics, "num-examples": int(fitres.num_examples)}},
                configs={},
            )
        for failure in failures:
            if isinstance(failure, tuple):
                proxy, fitres = failure
                reason = (
                    f"the client replied with status {fitres.status.code}: {fitres.status.message}"
                )
                self.writer.record_reply(
                    server_round, _node(proxy), None, metrics={}, configs={}, error=reason
                )
        self.writer.finish_round(server_round)
        if self.on_round is not None:
            self.on_round(server_round)
        return self.strategy.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Any) -> Any:
        return self.strategy.evaluate(server_round, parameters)


def _numbered(arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {str(i): np.asarray(a) for i, a in enumerate(arrays)}


def _node(proxy: Any) -> int:
    node = getattr(proxy, "node_id", None)
    return int(node) if node is not None else int(proxy.cid)


GUARD_KEY = "gradleak-guard-previous"


class ModelGuard:
    """A Flower client mod that refuses weights crafted to extract the client's data.

    One line in a ClientApp::

        app = ClientApp(mods=[ModelGuard()])

    Before every train message reaches the client's own code, it inspects the
    arrays received (`integrations.guard.inspect_weights`: repeated or aligned
    rows, ordered biases, copying or zeroed kernels, a jump from the previous
    round's weights, which it keeps in the node's context state) and, on any
    sign of crafting, replies with an error naming the reasons instead of
    training: the server gets nothing computed on the client's data.

    Args:
        settings: The checks' thresholds (`GuardSettings`).
    """

    def __init__(self, settings: GuardSettings | None = None) -> None:
        self.settings = settings or GuardSettings()

    def __call__(self, msg: Message, context: Any, call_next: Callable[..., Message]) -> Message:
        from flwr.app import Error, MessageType
        from flwr.common.constant import ErrorCode

        if msg.metadata.message_type != MessageType.TRAIN or msg.has_error():
            return call_next(msg, context)
        records = list(msg.content.array_records.values())
        if len(records) != 1:
            return call_next(msg, context)
        received = {name: array.numpy() for name, array in records[0].items()}
        stored = context.state.array_records.get(GUARD_KEY)
        previous = None if stored is None else {n: a.numpy() for n, a in stored.items()}
        reasons = inspect_weights(received, previous, self.settings)
        context.state[GUARD_KEY] = ArrayRecord({name: array for name, array in records[0].items()})
        if reasons:
            reason = "ModelGuard refused the weights: " + "; ".join(reasons[:4])
            log.warning("%s", reason)
            return Message(
                Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg
            )
        return call_next(msg, context)
