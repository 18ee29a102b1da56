"""What a federated server saw, on disk: the capture format `gradleak audit` reads.

A capture folder holds, for every round and every node the server sent work
to, the arrays and config it sent and the reply it got back:

    CAPTURES/capture.json                  the run: model spec, schedule keys, stack
    CAPTURES/round-0001/sent-<sha>.safetensors    the arrays sent (one file per content)
    CAPTURES/round-0001/reply-<node>.safetensors  a node's reply arrays
    CAPTURES/round-0001/node-<node>.json          the sidecar of that node's round

A sidecar names its two safetensors files (paths relative to the capture
folder), their sha256, the array records they hold and their array names, the
config records sent, and the reply's metric records, `num-examples` and error.
Arrays are stored under ``"<record>/<array name>"``; safetensors files hold
raw tensors and a JSON header, so reading one never runs code.

Why every sidecar repeats the sent file's checksum: one sidecar describes one
node's round completely, so a tampered, cut-off or missing file refuses that
node's round and no other (`read_exchanges`, `load_arrays`).

The writer (`CaptureWriter`) knows nothing of Flower: the wrappers in
`flower.py` turn messages into plain dicts of NumPy arrays and JSON values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradleak.errors import ConfigError, DataError

FORMAT = "gradleak-flower-capture"
VERSION = 1
CAPTURE_FILE = "capture.json"
PRIVATE_FOLDER = "private"  # the demo's clients' own batches, ground truth for the report

Records = dict[str, dict[str, np.ndarray]]  # record name -> array name -> array

_SHA = re.compile(r"[0-9a-f]{64}")
_ROUND_FOLDER = re.compile(r"round-(\d+)")
_NODE_FILE = re.compile(r"node-(\d+)\.json")


@dataclass(frozen=True)
class ModelInfo:
    """The model the clients train, as `gradleak.models.build_model` builds it.

    Attributes:
        name: A registry name ("lenet", "convnet", ...).
        input_shape: ``(channels, height, width)`` of one example.
        num_classes: Number of classes.
        width: Base width of "convnet" or "resnet18"; None for the others.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    width: int | None = None

    def __post_init__(self) -> None:
        from gradleak.models import MODELS

        if self.name not in MODELS:
            raise ConfigError(f"unknown model '{self.name}': choose one of {', '.join(MODELS)}")
        shape = tuple(self.input_shape)
        if len(shape) != 3 or not all(_whole(s) and s >= 1 for s in shape):
            raise ConfigError(
                f"input_shape must be 3 whole numbers (channels, height, width), got {shape!r}"
            )
        if not _whole(self.num_classes) or self.num_classes < 2:
            raise ConfigError(
                f"num_classes must be a whole number 2 or more, got {self.num_classes!r}"
            )
        if self.width is not None and (not _whole(self.width) or self.width < 1):
            raise ConfigError(f"width must be a whole number 1 or more, got {self.width!r}")
        object.__setattr__(self, "input_shape", tuple(int(s) for s in shape))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "width": self.width,
        }

    @classmethod
    def from_json(cls, value: Any, where: str) -> ModelInfo:
        if not isinstance(value, dict) or not {"name", "input_shape", "num_classes"} <= set(value):
            raise DataError(f"{where}: 'model' must hold name, input_shape and num_classes")
        shape = value["input_shape"]
        if not isinstance(shape, list):
            raise DataError(f"{where}: model input_shape must be a list of 3 numbers")
        try:
            return cls(str(value["name"]), tuple(shape), value["num_classes"], value.get("width"))
        except ConfigError as error:
            raise DataError(f"{where}: {error}") from None


@dataclass(frozen=True)
class ScheduleKeys:
    """Which keys of the train config hold the clients' local schedule.

    The audit reads the local learning rate and the number of local steps (or
    epochs) from the config the server sent; Flower leaves their names to the
    app, so the wrapper records which ones this app uses.

    Attributes:
        lr: The local SGD learning rate.
        local_steps: Mini-batch steps per round (give this or `epochs` in the config).
        epochs: Passes over the client's examples per round.
        batch_size: Examples per local step; absent means the whole batch.
    """

    lr: str = "lr"
    local_steps: str = "local-steps"
    epochs: str = "local-epochs"
    batch_size: str = "batch-size"

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: Any, where: str) -> ScheduleKeys:
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(value, dict) or not all(isinstance(value.get(n), str) for n in names):
            raise DataError(f"{where}: 'schedule_keys' must map {', '.join(names)} to strings")
        return cls(**{n: value[n] for n in names})


# --- writing --------------------------------------------------------------------------------


class CaptureWriter:
    """Writes a capture folder round by round (see the module docstring).

    Args:
        folder: The capture folder; created if needed.  It must not hold a
            capture already (node ids and rounds of two runs would mix).
        model: The model the clients train, or None (the audit then needs it
            on its command line).
        schedule: Which config keys hold the local schedule.
        stack: "message" (Flower's Message API) or "legacy" (its aggregate_fit API).
        strategy: A description of the wrapped strategy, for the report.
        weighted_by: The metric key that holds a reply's example count.

    Raises:
        ConfigError: The folder cannot be written or holds a capture already.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        model: ModelInfo | None,
        schedule: ScheduleKeys,
        stack: str,
        strategy: str,
        weighted_by: str = "num-examples",
        versions: Mapping[str, str] | None = None,
    ) -> None:
        from gradleak.outdir import prepare_out

        self.folder = prepare_out(folder)
        if (self.folder / CAPTURE_FILE).exists():
            raise ConfigError(
                f"{self.folder} holds a capture already; give the audit wrapper an empty folder"
            )
        self.weighted_by = weighted_by
        self._sent: dict[tuple[int, int], dict[str, Any]] = {}
        header = {
            "format": FORMAT,
            "version": VERSION,
            "model": None if model is None else model.to_json(),
            "schedule_keys": schedule.to_json(),
            "stack": stack,
            "strategy": strategy,
            "weighted_by": weighted_by,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": dict(versions or {}),
        }
        _write_atomically(self.folder / CAPTURE_FILE, _dumps(header))

    def store_sent(self, server_round: int, records: Records) -> dict[str, Any]:
        """Store arrays sent in `server_round` (once per content); returns their entry."""
        return self._store(server_round, "sent", records, name=None)

    def record_sent(
        self, server_round: int, node_id: int, stored: dict[str, Any], configs: Mapping[str, Any]
    ) -> None:
        """What the server sends `node_id` in `server_round`: arrays stored by `store_sent`
        (once per content: FedAvg sends one to every node) and the config records."""
        entry = dict(stored) | {"config": jsonable(configs)}
        self._sent[(int(server_round), int(node_id))] = entry

    def record_reply(
        self,
        server_round: int,
        node_id: int,
        records: Records | None,
        *,
        metrics: Mapping[str, Any],
        configs: Mapping[str, Any],
        error: str | None = None,
    ) -> None:
        """A node's reply: its arrays (None with an error), metric and config records."""
        if records is None:
            reply: dict[str, Any] = {"file": None, "sha256": None, "records": {}}
        else:
            reply = self._store(server_round, "reply", records, name=f"reply-{int(node_id)}")
        metrics = jsonable(metrics)
        reply |= {
            "metrics": metrics,
            "config": jsonable(configs),
            "num_examples": _count(metrics, self.weighted_by),
            "error": error,
        }
        self._write_sidecar(server_round, node_id, reply)

    def finish_round(self, server_round: int) -> None:
        """Write the sidecars of the nodes of `server_round` that never replied."""
        for key in [k for k in self._sent if k[0] == int(server_round)]:
            self._write_sidecar(key[0], key[1], None)

    def _write_sidecar(self, server_round: int, node_id: int, reply: dict[str, Any] | None) -> None:
        sent = self._sent.pop((int(server_round), int(node_id)), None)
        sidecar = {
            "round": int(server_round),
            "node_id": int(node_id),
            "sent": sent,
            "reply": reply,
        }
        path = self._round_folder(server_round) / f"node-{int(node_id)}.json"
        _write_atomically(path, _dumps(sidecar))

    def _store(
        self, server_round: int, kind: str, records: Records, *, name: str | None
    ) -> dict[str, Any]:
        flat = {
            f"{record}/{array}": np.ascontiguousarray(value)
            for record, arrays in records.items()
            for array, value in arrays.items()
        }
        from safetensors.numpy import save

        data = save(flat)
        digest = hashlib.sha256(data).hexdigest()
        # The same content sent to every node is stored once, named by its checksum.
        filename = f"{name or kind + '-' + digest[:16]}.safetensors"
        path = self._round_folder(server_round) / filename
        if name is not None or not path.exists():
            _write_atomically(path, data)
        return {
            "file": path.relative_to(self.folder).as_posix(),
            "sha256": digest,
            "records": {record: list(arrays) for record, arrays in records.items()},
        }

    def _round_folder(self, server_round: int) -> Path:
        folder = self.folder / f"round-{int(server_round):04d}"
        folder.mkdir(exist_ok=True)
        return folder


def jsonable(value: Any) -> Any:
    """Config and metric values as JSON: numbers, strings, lists; bytes as their length."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return {"bytes": len(value)}
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _count(metrics: Mapping[str, Any], key: str) -> int | None:
    for record in metrics.values():
        value = record.get(key) if isinstance(record, Mapping) else None
        if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
            return int(value)
    return None


# --- reading --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Capture:
    """A capture folder's header (capture.json), checked."""

    folder: Path
    model: ModelInfo | None
    schedule: ScheduleKeys
    stack: str
    strategy: str
    started: str


@dataclass(frozen=True)
class Stored:
    """One safetensors file a sidecar names: where, its checksum, its records' array names."""

    file: str
    sha256: str
    records: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class Exchange:
    """One node's round, as its sidecar describes it (types checked, files not yet read)."""

    round: int
    node_id: int
    sidecar: str
    sent: Stored
    config: dict[str, dict[str, Any]]
    reply: Stored | None
    metrics: dict[str, dict[str, Any]]
    num_examples: int | None
    error: str | None


def read_capture(folder: str | os.PathLike[str]) -> Capture:
    """Read and check capture.json.

    Raises:
        DataError: No capture there, or a capture.json gradleak did not write.
    """
    root = Path(folder).expanduser()
    path = root / CAPTURE_FILE
    if not root.is_dir():
        raise DataError(f"capture folder {folder} not found; give the folder LeakageAudit wrote")
    if not path.is_file():
        raise DataError(
            f"{folder} holds no {CAPTURE_FILE}; give the folder that "
            "LeakageAudit(strategy, out=...) wrote"
        )
    header = _read_json(path, f"{folder}/{CAPTURE_FILE}")
    where = f"{folder}/{CAPTURE_FILE}"
    if header.get("format") != FORMAT:
        raise DataError(
            f"{where} is not a gradleak Flower capture (format {header.get('format')!r})"
        )
    if header.get("version") != VERSION:
        raise DataError(
            f"{where} has format version {header.get('version')!r}; this gradleak reads {VERSION}"
        )
    model = header.get("model")
    stack = header.get("stack")
    if stack not in ("message", "legacy"):
        raise DataError(f"{where}: 'stack' must be message or legacy, got {stack!r}")
    return Capture(
        folder=root,
        model=None if model is None else ModelInfo.from_json(model, where),
        schedule=ScheduleKeys.from_json(header.get("schedule_keys"), where),
        stack=stack,
        strategy=str(header.get("strategy", "")),
        started=str(header.get("started", "")),
    )


@dataclass(frozen=True)
class Refused:
    """A sidecar that could not be read: its round and node (from its path) and why."""

    sidecar: str
    round: int
    node_id: int | None
    reason: str


def read_exchanges(capture: Capture) -> tuple[list[Exchange], list[Refused]]:
    """Every node's round whose sidecar is sound, and the sidecars that are not.

    Returns:
        The exchanges, by round and node id, and the refused sidecars.
    """
    exchanges: list[Exchange] = []
    problems: list[Refused] = []
    for round_folder in sorted(capture.folder.iterdir()):
        match = _ROUND_FOLDER.fullmatch(round_folder.name)
        if match is None or not round_folder.is_dir():
            continue
        for path in sorted(round_folder.glob("node-*.json")):
            name = f"{round_folder.name}/{path.name}"
            try:
                exchange = _exchange(capture.folder, path, name)
                if exchange.round != int(match.group(1)):
                    raise DataError(f"{name} says round {exchange.round}, its folder another")
                exchanges.append(exchange)
            except DataError as error:
                node = _NODE_FILE.fullmatch(path.name)
                number = int(node.group(1)) if node is not None else None
                problems.append(Refused(name, int(match.group(1)), number, str(error)))
    exchanges.sort(key=lambda e: (e.round, e.node_id))
    return exchanges, problems


def load_arrays(capture: Capture, stored: Stored, what: str) -> Records:
    """Read one safetensors file of a sidecar, after checking its checksum.

    Raises:
        DataError: The file is missing, outside the folder, changed, cut off,
            or does not hold the arrays the sidecar lists.
    """
    path = inside(capture.folder, stored.file, what)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"{what}: cannot read {stored.file} ({error.strerror})") from None
    if hashlib.sha256(data).hexdigest() != stored.sha256:
        raise DataError(
            f"{what}: {stored.file} does not match its sha256 (changed or cut off since the "
            "capture); it was not audited"
        )
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        flat = load(data)
    except (SafetensorError, ValueError) as error:
        raise DataError(
            f"{what}: {stored.file} is not a readable safetensors file ({error})"
        ) from None
    records: Records = {}
    for record, names in stored.records.items():
        records[record] = {}
        for name in names:
            key = f"{record}/{name}"
            if key not in flat:
                raise DataError(f"{what}: {stored.file} lacks the array {key!r} its sidecar lists")
            records[record][name] = flat[key]
    return records


def inside(folder: Path, relative: str, what: str) -> Path:
    """`folder / relative`, refused unless it stays inside `folder` (links resolved)."""
    if not relative or Path(relative).is_absolute():
        raise DataError(f"{what}: the path {relative!r} is not relative to the capture folder")
    root = folder.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise DataError(
            f"{what} points outside the capture folder ({relative}); refused: a capture names "
            "only its own files"
        )
    if not path.is_file():
        raise DataError(f"{what}: {relative} is missing from the capture folder")
    return path


def _exchange(folder: Path, path: Path, name: str) -> Exchange:
    sidecar = _read_json(path, name)
    node_match = _NODE_FILE.fullmatch(path.name)
    round_ = sidecar.get("round")
    node_id = sidecar.get("node_id")
    if not _whole(round_) or round_ < 1 or not _whole(node_id):
        raise DataError(f"{name}: 'round' and 'node_id' must be whole numbers")
    if node_match is None or int(node_match.group(1)) != node_id:
        raise DataError(f"{name} says node {node_id}, its file name another")
    sent = sidecar.get("sent")
    if not isinstance(sent, dict):
        raise DataError(f"{name}: no record of what was sent to node {node_id}")
    reply = sidecar.get("reply")
    if reply is not None and not isinstance(reply, dict):
        raise DataError(f"{name}: 'reply' must be an object or null")
    reply = reply or {}
    metrics = _records_of_values(reply.get("metrics", {}), f"{name}: reply metrics")
    count = reply.get("num_examples")
    if count is not None and (not _whole(count) or count < 0):
        raise DataError(f"{name}: num_examples must be a whole number or null")
    error = reply.get("error")
    if error is not None and not isinstance(error, str):
        raise DataError(f"{name}: 'error' must be text or null")
    stored_reply = None
    if sidecar.get("reply") is not None and reply.get("file") is not None:
        stored_reply = _stored(folder, reply, f"{name} (reply)")
    return Exchange(
        round=round_,
        node_id=node_id,
        sidecar=name,
        sent=_stored(folder, sent, f"{name} (sent)"),
        config=_records_of_values(sent.get("config", {}), f"{name}: sent config"),
        reply=stored_reply,
        metrics=metrics,
        num_examples=count,
        error=error if sidecar.get("reply") is not None else "no reply reached the server",
    )


def _stored(folder: Path, value: dict[str, Any], what: str) -> Stored:
    file, digest, records = value.get("file"), value.get("sha256"), value.get("records")
    if not isinstance(file, str):
        raise DataError(f"{what}: 'file' must be a path in the capture folder")
    inside(folder, file, what)
    if not isinstance(digest, str) or _SHA.fullmatch(digest) is None:
        raise DataError(f"{what}: 'sha256' must be 64 hex digits")
    if not isinstance(records, dict) or not all(
        isinstance(names, list) and all(isinstance(n, str) for n in names)
        for names in records.values()
    ):
        raise DataError(f"{what}: 'records' must map record names to lists of array names")
    return Stored(file, digest, {str(k): tuple(v) for k, v in records.items()})


def _records_of_values(value: Any, what: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise DataError(f"{what} must map record names to objects")
    return value


def _read_json(path: Path, name: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise DataError(f"cannot read {name} ({error.strerror})") from None
    except ValueError as error:
        raise DataError(f"{name} is not valid JSON (cut off or edited?): {error}") from None
    if not isinstance(value, dict):
        raise DataError(f"{name} must hold a JSON object")
    return value


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dumps(value: Any) -> bytes:
    return (json.dumps(value, indent=1, allow_nan=False) + "\n").encode()


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
