"""The files that make a long reproduction resumable: results.jsonl and run.json.

results.jsonl holds one JSON line per finished (experiment, method) attack.
Lines are only ever appended, each batch with flush + fsync, so a crash or a
kill loses at most the batch in flight; a last line cut off mid-write is
dropped on the next start and its attack run again.  run.json pins what the
lines mean (dataset, mode, seed, data), so a rerun cannot mix in results of a
different protocol.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any

from gradleak.errors import ConfigError, DataError

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
RUN = "run.json"

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


def pin_run(out: Path, params: Mapping[str, Any]) -> dict[str, Any]:
    """Write run.json at the first start; on a rerun, check it matches.

    Args:
        out: The run's folder.
        params: This invocation's parameters; the `PINNED` ones must equal
            those stored by the first start.

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
    changed = [k for k in PINNED if stored.get(k) != params.get(k)]
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
