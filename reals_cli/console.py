"""Terminal output: one rich console on stderr, progress bars and summary tables."""

from __future__ import annotations

import math
import time
from typing import Any, Iterable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from rich.table import Table

# stderr, so that stdout stays clean for whatever a pipeline pipes on. No markup: messages hold
# paths and pip extras (`reals-cli[cuda]`) whose brackets rich would take for style tags.
console = Console(stderr=True, highlight=False, markup=False)


def labelled(label: str, style: str, message: str) -> None:
    """`label message` with the label styled, the message printed as it is, on one line."""
    console.print(Text.assemble((label, style), " ", message), soft_wrap=True)


class _StatusColumn(ProgressColumn):
    """Free text a loop updates as it goes (`progress.update(task, status="loss 0.12")`)."""

    def render(self, task) -> Text:
        return Text(str(task.fields.get("status", "")))


class _Progress(Progress):
    """rich's bar, which draws nothing until the end when stderr is not a terminal (a SLURM
    log, `2> run.log`): there a long job would look dead for hours. So off a terminal it also
    prints a plain line per task, at its first update, then at most every `every` seconds,
    and when it finishes."""

    def __init__(self, *columns, every: float = 30.0, **kw):
        super().__init__(*columns, **kw)
        self._plain = not self.console.is_terminal and not self.disable
        self._every, self._last = every, {}

    def update(self, task_id, **kw) -> None:
        super().update(task_id, **kw)
        self._log(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id) -> None:
        if not self._plain:
            return
        task, now = self._tasks[task_id], time.monotonic()
        last = self._last.get(task_id)  # inf: its finished line is out
        if last == math.inf or (last is not None and now - last < self._every and not task.finished):
            return
        self._last[task_id] = math.inf if task.finished else now
        done = f"{task.completed:.0f}/{task.total:.0f}" if task.total else f"{task.completed:.0f}"
        eta = f", {task.time_remaining:.0f} s left" if task.time_remaining is not None and not task.finished else ""
        status = task.fields.get("status", "")
        self.console.print(f"{task.description}: {done}{f' {status}' if status else ''}"
                           f" ({task.elapsed or 0:.0f} s{eta})", soft_wrap=True, markup=False)


def progress(transient: bool = False, disable: bool = False) -> Progress:
    """A progress bar; `disable` for the other ranks of a multi-process run."""
    return _Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        _StatusColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=disable,
    )


def _fmt(value: Any) -> str:
    if value is None:  # not measured
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_table(title: str, rows: dict[str, Any] | Iterable[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in (rows.items() if isinstance(rows, dict) else rows):
        table.add_row(str(key), _fmt(value))
    return table


def print_summary(title: str, rows: dict[str, Any] | Iterable[tuple[str, Any]]) -> None:
    console.print(summary_table(title, rows))


def warn(message: str) -> None:
    labelled("warning:", "yellow", message)  # one line in a log file too
