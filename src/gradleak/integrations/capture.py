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
node's round and no other (`reader.read_exchanges`, `reader.load_arrays`).

The writer (`CaptureWriter`) knows nothing of Flower: the wrappers in
`flower.py` turn messages into plain dicts of NumPy arrays and JSON values.
The checked reader is `reader.py`.
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

SHA = re.compile(r"[0-9a-f]{64}")
ROUND_FOLDER = re.compile(r"round-(\d+)")
NODE_FILE = re.compile(r"node-(\d+)\.json")


@dataclass(frozen=True)
class ModelInfo:
    """The model the clients train: a registry name, or the user's own by import path.

    Attributes:
        name: A registry name ("lenet", "convnet", ...) or an import path
            ``package.module:Name`` of the user's class or factory.  A path is
            recorded, never imported from a capture: the audit imports only
            the path its user gives on the command line, and checks the model
            it builds against `fingerprint`.
        input_shape: ``(channels, height, width)`` of one example.
        num_classes: Number of classes.
        width: Base width of "convnet" or "resnet18"; None for the others.
        fingerprint: ``sha256:...`` of the architecture (every parameter's and
            buffer's name, shape and dtype; `models.user.fingerprint`), or None.
        normalize: The clients' input normalisation, ``{"mean": [...], "std":
            [...]}`` per channel, or None for pixels fed as they are.
        model_args: Keyword arguments of the user's class or factory.
    """

    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    width: int | None = None
    fingerprint: str | None = None
    normalize: dict[str, list[float]] | None = None
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        from gradleak.models import MODELS, is_import_path

        if not is_import_path(self.name) and self.name not in MODELS:
            raise ConfigError(
                f"unknown model '{self.name}': choose one of {', '.join(MODELS)}, "
                "or give your own as package.module:Name"
            )
        shape = tuple(self.input_shape)
        if len(shape) != 3 or not all(whole(s) and s >= 1 for s in shape):
            raise ConfigError(
                f"input_shape must be 3 whole numbers (channels, height, width), got {shape!r}"
            )
        if not whole(self.num_classes) or self.num_classes < 2:
            raise ConfigError(
                f"num_classes must be a whole number 2 or more, got {self.num_classes!r}"
            )
        if self.width is not None and (not whole(self.width) or self.width < 1):
            raise ConfigError(f"width must be a whole number 1 or more, got {self.width!r}")
        if self.fingerprint is not None and not re.fullmatch(
            r"sha256:[0-9a-f]{64}", self.fingerprint
        ):
            raise ConfigError(
                f"a model fingerprint is sha256:<64 hex digits>, got {self.fingerprint!r}"
            )
        if self.normalize is not None:
            _check_normalize(self.normalize, shape[0])
        object.__setattr__(self, "input_shape", tuple(int(s) for s in shape))

    @property
    def user_model(self) -> bool:
        """Whether this is the user's own model (an import path), not a registry name."""
        return ":" in self.name

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "width": self.width,
            "fingerprint": self.fingerprint,
            "normalize": self.normalize,
            "model_args": dict(self.model_args),
        }

    @classmethod
    def from_json(cls, value: Any, where: str) -> ModelInfo:
        if not isinstance(value, dict) or not {"name", "input_shape", "num_classes"} <= set(value):
            raise DataError(f"{where}: 'model' must hold name, input_shape and num_classes")
        shape = value["input_shape"]
        if not isinstance(shape, list):
            raise DataError(f"{where}: model input_shape must be a list of 3 numbers")
        args = value.get("model_args") or {}
        if not isinstance(args, dict):
            raise DataError(f"{where}: model_args must be a JSON object")
        try:
            return cls(
                str(value["name"]), tuple(shape), value["num_classes"], value.get("width"),
                value.get("fingerprint"), value.get("normalize"), dict(args),
            )  # fmt: skip
        except (ConfigError, TypeError) as error:
            raise DataError(f"{where}: {error}") from None


def _check_normalize(value: Any, channels: int) -> None:
    if not isinstance(value, dict) or set(value) != {"mean", "std"}:
        raise ConfigError("normalize must be {'mean': [...], 'std': [...]}")
    mean, std = value["mean"], value["std"]
    ok = (
        isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == channels
        and all(isinstance(v, int | float) and math.isfinite(v) for v in mean + std)
        and all(v > 0 for v in std)
    )  # fmt: skip
    if not ok:
        raise ConfigError(
            f"normalize needs {channels} finite means and {channels} stds above 0, got {value!r}"
        )


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
        malicious: What a dishonest server crafted (the demo's `--malicious`: the
            attack and its plan), said in the header and in every report.
        text_model: For a language model fine-tuned with LoRA (the demo's
            ``--task text``): the JSON spec the text audit rebuilds it from
            (`experiments.flower_demo.text_task.TextModelSpec`).

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
        malicious: Mapping[str, Any] | None = None,
        text_model: Mapping[str, Any] | None = None,
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
        if malicious is not None:
            # Only gradleak's own demo writes this: its server crafted the weights it sent.
            header["malicious"] = jsonable(dict(malicious))
        if text_model is not None:
            header["text_model"] = jsonable(dict(text_model))
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


def whole(value: Any) -> bool:
    """An int, not a bool (JSON's true is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _dumps(value: Any) -> bytes:
    return (json.dumps(value, indent=1, allow_nan=False) + "\n").encode()


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_ground_truth(
    captures: str | os.PathLike[str],
    server_round: int,
    node_id: int,
    images: Any,
    labels: Any,
) -> Path:
    """Store one node's private examples of a round beside a capture, for the audit to score.

    Only for runs whose clients' data you hold (a simulation): `gradleak audit`
    then reports MSE, PSNR, SSIM and the label histogram's error against them.
    `images` are the examples in pixel space (``(n, C, H, W)`` in [0, 1],
    before any normalisation), in any order; `labels` their classes.

    Returns:
        The file written, ``CAPTURES/private/round-NNNN/node-<id>.safetensors``.
    """
    import torch
    from safetensors.torch import save_file

    folder = Path(captures) / PRIVATE_FOLDER / f"round-{int(server_round):04d}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"node-{int(node_id)}.safetensors"
    tensors = {
        "images": torch.as_tensor(images, dtype=torch.float32).contiguous(),
        "labels": torch.as_tensor(labels, dtype=torch.int64).contiguous(),
    }
    save_file(tensors, str(path))
    return path
