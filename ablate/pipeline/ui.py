"""How the engine talks to a person: progress bars with throughput and ETA, and messages.

The engine only calls `stage(...)`, `info(...)` and `warn(...)`; `RichUI` draws them in a terminal,
`QuietUI` drops them (tests, `--quiet`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


class RateColumn(ProgressColumn):
    """Units per second of the task (e.g. tokens/s)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        if speed is None:
            return Text(f"– {unit}/s", style="dim")
        shown = f"{speed / 1e6:.2f}M" if speed >= 1e6 else f"{speed / 1e3:.1f}k" if speed >= 1e3 else f"{speed:.1f}"
        return Text(f"{shown} {unit}/s", style="cyan")


class QuietUI:
    @contextmanager
    def stage(self, name: str, total: float | None, unit: str = "tokens") -> Iterator[Callable[[int], None]]:
        yield lambda n: None

    def info(self, msg: str) -> None:
        pass

    def warn(self, msg: str) -> None:
        pass


class RichUI:
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)

    @contextmanager
    def stage(self, name: str, total: float | None, unit: str = "tokens") -> Iterator[Callable[[int], None]]:
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(), RateColumn(),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(name, total=total, unit=unit)
            yield lambda n: progress.advance(task, n)
            progress.update(task, completed=total if total else None)

    def info(self, msg: str) -> None:
        self.console.print(msg)

    def warn(self, msg: str) -> None:
        self.console.print(f"[yellow]warning:[/] {msg}")
