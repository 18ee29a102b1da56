"""Progress bars of the long commands: one bar per stage, shown from the first update.

Every long command (reproductions, defense audits, attacks) shows what is done,
the elapsed time and an ETA.  The bars start with the first progress report,
not before: bad input is found before any work, so it prints its one error
line and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress(console: Console, unit: str) -> Progress:
    """A bar with count, `unit` (a rich text template), elapsed time and ETA."""
    columns: list[ProgressColumn] = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
    ]
    if unit:
        columns.append(TextColumn(unit))
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*columns, console=console)


class StageBars:
    """One bar per stage key; call it as a run's progress callback.

    Use as a context manager so the bars stop (and the terminal is left
    clean) however the run ends.

    Args:
        console: Where to draw.
        unit: What is counted, e.g. "experiments".
        describe: The bar's label for a stage key.
    """

    def __init__(
        self, console: Console, unit: str, describe: Callable[[Hashable], str] = str
    ) -> None:
        self.progress = progress(console, unit)
        self.describe = describe
        self.tasks: dict[Hashable, TaskID] = {}

    def __call__(self, stage: Hashable, done: float, total: int) -> None:
        if not self.progress.live.is_started:
            self.progress.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(self.describe(stage), total=total)
        self.progress.update(self.tasks[stage], completed=done)

    def __enter__(self) -> StageBars:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.progress.live.is_started:
            self.progress.stop()
