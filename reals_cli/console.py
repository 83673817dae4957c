"""Terminal output: one rich console on stderr, progress bars and summary tables."""

from __future__ import annotations

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

# stderr, so that stdout stays clean for whatever a pipeline pipes on.
console = Console(stderr=True, highlight=False)


class _StatusColumn(ProgressColumn):
    """Free text a loop updates as it goes (`progress.update(task, status="loss 0.12")`)."""

    def render(self, task) -> Text:
        return Text(str(task.fields.get("status", "")))


def progress(transient: bool = False, disable: bool = False) -> Progress:
    """A progress bar; `disable` for the other ranks of a multi-process run."""
    return Progress(
        TextColumn("[bold]{task.description}"),
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
    console.print(f"[yellow]warning:[/yellow] {message}")
