"""Progress bars that also work in logs (CI, `ablate`'s run logs, `| tee`)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class LoggedProgress(Progress):
    """A rich progress bar that also works in logs: when the output is not a terminal (CI, the run
    logs `ablate` writes), rich draws nothing until the end, so print a plain line every `every_s`."""

    def __init__(self, *columns, every_s: float = 30.0, **kwargs):
        super().__init__(*columns, **kwargs)
        self.every_s = every_s
        self._last_line = time.monotonic()

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._log_line(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log_line(task_id)

    def _log_line(self, task_id) -> None:
        if self.console.is_terminal or time.monotonic() - self._last_line < self.every_s:
            return
        self._last_line = time.monotonic()
        task = self._tasks[task_id]
        elapsed = f"{task.elapsed:.0f}s" if task.elapsed is not None else ""
        line = f"{time.strftime('%H:%M:%S')} {task.description} {task.completed:g}/{task.total:g} {task.fields.get('info', '')} {elapsed}"
        self.console.print(line, highlight=False)


def progress_bar(transient: bool = False, console=None) -> Progress:
    """A progress bar on stderr (unless `console` says otherwise): stdout carries results alone, so
    `parityrl check --json > file` stays JSON even when the check has to warm up an asset first."""
    return LoggedProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=transient,
        console=console if console is not None else Console(stderr=True),
    )
