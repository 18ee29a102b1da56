"""The one sweep runner: a plan of groups of work items, run anywhere, stored once.

A sweep is a list of `Group`s.  Each group names the keys of the items it
produces (an item is one attack, one training run) and carries a small,
picklable `spec` of what to compute.  A *task*, a plain top-level function
``task(context, spec, emit)``, computes a group's items from the spec and the
run's `context` (a frozen config) and calls ``emit(row, attachments)`` as
each item ends: `row` is the item's JSON line, `attachments` maps file names
to bytes that must reach the run folder before the line does (a strip's
frames, an example image).

The runner sends groups to an executor (this process, worker processes, or
Ray tasks; executors.py), and in this process, the only one that writes,
saves each attachment and appends each row to the `ResultsStore` as it
arrives.  Executors decide where a group runs, never what it computes.

Why groups are fixed and rerun whole: the batched engine attacks a group's
victims as one computation, and float arithmetic on a batch is not the same
bit for bit as on another batch holding the same victim.  So the plan splits
the items into groups from the run's settings alone (never from what is
already done, nor from the number of workers), and a group that an
interruption cut short is run again whole: the rows it had already written
are recomputed identically and skipped.  Hence a resumed run, a run on two
workers and a run on Ray give the same rows as an uninterrupted run in one
process, bit for bit on one machine.  The price: an interrupted group's
finished items are computed twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gradleak.errors import GradleakError
from gradleak.sweep.store import ResultsStore

log = logging.getLogger(__name__)

Row = dict[str, Any]
Attachments = Mapping[str, bytes]
Emit = Callable[[Row, Attachments | None], None]
Task = Callable[[Any, Any, Emit], None]
# progress(items done, items in the plan)
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Group:
    """Items computed together: their keys and what the task needs to compute them."""

    keys: tuple[Hashable, ...]
    spec: Any


class Executor(Protocol):
    """Runs groups somewhere and hands back what their tasks emit.

    ``run(task, context, groups, receive)`` calls ``receive(index, row,
    attachments)`` in this process for every item of ``groups[index]`` as
    it ends, and returns the one-line reports of groups it could not finish
    (a worker that died).  An error the task raises on purpose (a
    `GradleakError`: bad input found late) is raised again here.
    """

    name: str

    def run(
        self,
        task: Task,
        context: Any,
        groups: Sequence[Group],
        receive: Callable[[int, Row, Attachments | None], None],
    ) -> list[str]: ...


class SweepIncomplete(GradleakError):
    """Some groups were lost (a worker died); what was finished is stored."""


def run_sweep(
    store: ResultsStore,
    groups: Sequence[Group],
    task: Task,
    context: Any,
    executor: Executor,
    *,
    on_row: Callable[[Row], None] | None = None,
    progress: Progress | None = None,
) -> list[Row]:
    """Run every group that still has a missing item; store rows as they arrive.

    Args:
        store: The results file; rows whose key it holds are not written again.
        groups: The whole plan (done groups are skipped here).
        task: ``task(context, spec, emit)``, a top-level function (it is
            pickled to reach worker processes and Ray).
        context: The run's frozen settings, passed to every task call.
        executor: Where the groups run.
        on_row: Called in this process after each new row is stored (to
            refresh summary.json, say).
        progress: ``progress(done, total)`` over the plan's items.

    Returns:
        The rows added by this call, in the order they arrived.

    Raises:
        SweepIncomplete: A worker died; its unfinished items are not
            written and the next run of the same command does them.
    """
    total = sum(len(g.keys) for g in groups)
    expected = [set(g.keys) for g in groups]
    pending = [i for i, g in enumerate(groups) if any(k not in store for k in g.keys)]
    done = total - sum(sum(1 for k in groups[i].keys if k not in store) for i in pending)
    if progress is not None:
        progress(done, total)
    log.info("%d of %d groups to run on %s", len(pending), len(groups), executor.name)
    added: list[Row] = []
    folder = store.path.parent

    def receive(index: int, row: Row, attachments: Attachments | None) -> None:
        nonlocal done
        identity = store.key(row)
        if identity not in expected[pending[index]]:
            raise RuntimeError(f"a task emitted {identity!r}, which its group does not hold")
        if identity in store:
            return  # a rerun of an interrupted group: this item was stored before
        for name, data in (attachments or {}).items():
            _write_atomically(folder / name, data)
        store.add(row)
        added.append(row)
        done += 1
        if on_row is not None:
            on_row(row)
        if progress is not None:
            progress(done, total)

    started = time.perf_counter()
    failures = executor.run(task, context, [groups[i] for i in pending], receive)
    log.info("%d rows in %.1f s", len(added), time.perf_counter() - started)
    if failures:
        missing = sum(1 for g in groups for k in g.keys if k not in store)
        raise SweepIncomplete(
            f"{failures[0]}"
            + (f" (and {len(failures) - 1} more)" if len(failures) > 1 else "")
            + f"; {missing} items are not written: rerun the same command to do them"
        )
    return added


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """`items` cut into consecutive pieces of `size` (the last may be shorter)."""
    return [items[i : i + size] for i in range(0, len(items), max(1, size))]


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
