"""The files that make a long sweep resumable: results.jsonl, run.json and a lock.

results.jsonl holds one JSON line per finished work item (an attack, a
training run).  Lines are only ever appended, each with flush + fsync, so a
crash or a kill loses only what was in flight; a last line cut off mid-write
is dropped on the next start and its item run again.  run.json pins what the
lines mean (dataset, mode, seed, data), so a rerun cannot mix in results of a
different protocol.  A lock file keeps a second run out of a folder that one
run is writing to.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradleak.errors import ConfigError, DataError

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
RUN = "run.json"
LOCK = ".lock"

# What a rerun must share with the first start for the lines to mean the same.
PINNED = ("paper", "dataset", "mode", "seed", "model", "dataset_size")


def _experiment_method(row: Mapping[str, Any]) -> Hashable:
    return int(row["experiment"]), str(row["method"])


def read_results(
    path: Path, key: Callable[[Mapping[str, Any]], Hashable] = _experiment_method
) -> list[dict[str, Any]]:
    """Read a results file of JSON lines, repairing a last line that a kill cut short.

    A line without its final newline was being written when the process died:
    it is cut off the file (so that the next append starts on a fresh line)
    and its attack is run again.  Lines are identified by `key` (by default
    experiment and method); a duplicate keeps the first line, though the
    writers never produce one.  A line `key` cannot read is not a result line.

    Raises:
        DataError: A complete line in the middle is not valid JSON (the file
            was edited by hand); results cannot be trusted then.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a last line cut off mid-write (%d bytes)", path, len(data) - end)
        os.truncate(path, end)
    rows: list[dict[str, Any]] = []
    seen: set[Hashable] = set()
    for number, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            identity = key(row)
        except (ValueError, KeyError, TypeError):
            raise DataError(
                f"{path} line {number} is not a result line; fix it or use another --out"
            ) from None
        if identity not in seen:
            seen.add(identity)
            rows.append(row)
    return rows


def append_results(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows as JSON lines and force them to disk before returning."""
    text = "".join(json.dumps(dict(row), allow_nan=False) + "\n" for row in rows)
    if not text:
        return
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def pin_run(out: Path, params: Mapping[str, Any], pinned: Sequence[str] = PINNED) -> dict[str, Any]:
    """Write run.json at the first start; on a rerun, check it matches.

    Args:
        out: The run's folder.
        params: This invocation's parameters; the `pinned` ones must equal
            those stored by the first start.
        pinned: The keys that must match (default `PINNED`).

    Returns:
        The stored parameters (those of the first start).

    Raises:
        ConfigError: The folder holds a run with other pinned parameters, or
            results without a run.json.
    """
    run_file, results = out / RUN, out / RESULTS
    if not run_file.exists():
        if results.exists() and results.stat().st_size > 0:
            raise ConfigError(
                f"{out} holds {RESULTS} but no {RUN}; it is not a run this command can resume, "
                "use another --out"
            )
        out.mkdir(parents=True, exist_ok=True)
        write_json(run_file, dict(params))
        return dict(params)
    try:
        stored = json.loads(run_file.read_text())
    except ValueError:
        raise ConfigError(f"{run_file} is not valid JSON; use another --out") from None
    changed = [k for k in pinned if stored.get(k) != params.get(k)]
    if changed:
        what = ", ".join(f"{k} {stored.get(k)!r} -> {params.get(k)!r}" for k in changed)
        raise ConfigError(
            f"{out} holds a run with other settings ({what}); "
            "use another --out, or the same settings to resume it"
        )
    return stored


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a crash never leaves half a file behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


class FolderLock:
    """An exclusive lock on a run folder while one run writes to it.

    Two runs appending to one results.jsonl would both do every item.  The
    lock is an OS file lock (flock) on ``OUT/.lock``: it goes away with the
    process however it ends (kill -9 included), so a stale lock never blocks
    a rerun.  The file holds the owner's process id, for the error message.
    """

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK
        self._handle: Any = None

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise ConfigError(
                f"{self.path.parent} is in use by another gradleak run (process {owner}); "
                "wait for it to end or use another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.close()  # closing releases the flock
            self._handle = None


class ResultsStore:
    """One JSON-lines results file of a run folder, keyed by `key`.

    `add` appends a row (fsynced) unless its key is already there, so a
    group of items that is run again after an interruption writes only the
    items that were missing.

    Args:
        path: The results file.
        key: A row's identity (for example experiment and method).
    """

    def __init__(self, path: Path, key: Callable[[Mapping[str, Any]], Hashable]) -> None:
        self.path = Path(path)
        self.key = key
        self.rows = read_results(self.path, key=key)
        self.done = {key(row) for row in self.rows}

    def __contains__(self, identity: Hashable) -> bool:
        return identity in self.done

    def add(self, row: Mapping[str, Any]) -> bool:
        """Append `row` unless its key is stored; returns whether it was new."""
        identity = self.key(row)
        if identity in self.done:
            return False
        append_results(self.path, [row])
        self.rows.append(dict(row))
        self.done.add(identity)
        return True
