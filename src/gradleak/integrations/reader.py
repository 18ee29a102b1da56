"""Reading a capture folder (`capture.py`'s format), every value checked before it is used.

`read_capture` checks capture.json; `read_exchanges` reads every node's
sidecar and sets aside, one line each, the ones that are not sound (bad
JSON, wrong types, a path outside the folder, a file missing); `load_arrays`
reads one safetensors file a sidecar names after checking its sha256.  A
problem refuses one node's round, never the whole capture.  Nothing read
here can run code: JSON and safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradleak.errors import DataError
from gradleak.integrations.capture import (
    CAPTURE_FILE,
    FORMAT,
    NODE_FILE,
    ROUND_FOLDER,
    SHA,
    VERSION,
    ModelInfo,
    Records,
    ScheduleKeys,
    whole,
)


@dataclass(frozen=True)
class Capture:
    """A capture folder's header (capture.json), checked."""

    folder: Path
    model: ModelInfo | None
    schedule: ScheduleKeys
    stack: str
    strategy: str
    started: str
    malicious: dict[str, Any] | None = None
    text_model: dict[str, Any] | None = None  # checked by the text audit, which reads it


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
        malicious=_malicious(header.get("malicious"), where),
        text_model=_text_model(header.get("text_model"), where),
    )


def _text_model(value: Any, where: str) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise DataError(f"{where}: 'text_model' must be a JSON object")
    return value


def _malicious(value: Any, where: str) -> dict[str, Any] | None:
    """The demo's dishonest server's plan, checked (`attacks.imprint.plan_to_json`):
    {"attack": "binning" or "output-rows", "layer", "input_shape", "thresholds" (binning),
    "front": null or the pass-through's {"kind", "resolution", "activation", "batchnorm",
    "fitted"}}.  Whether it fits the weights sent is checked where they are read (the audit).
    """
    if value is None:
        return None
    ok = (
        isinstance(value, dict) and value.get("attack") in ("binning", "output-rows")
        and isinstance(value.get("layer"), str)
        and isinstance(value.get("input_shape"), list)
        and all(_count(v) for v in value["input_shape"])
        and (value["attack"] != "binning" or _numbers(value.get("thresholds")))
        and _front_ok(value.get("front"))
    )  # fmt: skip
    if not ok:
        raise DataError(
            f"{where}: 'malicious' is not a dishonest server's plan gradleak wrote; rerun the "
            "demo into a new --out"
        )
    return value


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _numbers(v: Any) -> bool:
    return (
        isinstance(v, list)
        and bool(v)
        and all(
            isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) for t in v
        )
    )


def _front_ok(front: Any) -> bool:
    """The pass-through part of a plan: absent (null), or what `PassThroughPlan.to_json` wrote."""
    if front is None:
        return True
    fitted = front.get("fitted") if isinstance(front, dict) else None
    return (
        isinstance(front, dict) and front.get("kind") in ("strided", "pooled")
        and isinstance(front.get("resolution"), str)
        and front.get("activation") in ("relu", "sigmoid")
        and isinstance(front.get("batchnorm"), bool)
        and (fitted is None or (isinstance(fitted, list) and all(
            _numbers(pair) and len(pair) == 2 for pair in fitted)))
    )  # fmt: skip


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
        match = ROUND_FOLDER.fullmatch(round_folder.name)
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
                node = NODE_FILE.fullmatch(path.name)
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
    node_match = NODE_FILE.fullmatch(path.name)
    round_ = sidecar.get("round")
    node_id = sidecar.get("node_id")
    if not whole(round_) or round_ < 1 or not whole(node_id):
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
    if count is not None and (not whole(count) or count < 0):
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
    if not isinstance(digest, str) or SHA.fullmatch(digest) is None:
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
