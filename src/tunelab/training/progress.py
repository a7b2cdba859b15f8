"""Training progress: a live bar on a terminal, plain lines anywhere else (logs, nohup, CI).

On a terminal rich draws its bar. Without one (output redirected to a file or pipe) a bar would
print nothing until the end, so :class:`LineProgress` prints one plain line instead at the first
step, every :data:`LINES_PER_RUN`-th of the run (in steps) or :data:`LINE_EVERY_S` seconds,
whichever comes first, and at the last step::

    step 40/200 (20%)  loss 1.2345 lr 2.00e-04 5321 tok/s  elapsed 0:01:02  eta 0:04:08
"""

from __future__ import annotations

import math
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

LINES_PER_RUN = 20  # a line every total/20 steps ...
LINE_EVERY_S = 30.0  # ... or every 30 s, whichever comes first


def training_progress(quiet: bool, console: Console | None = None) -> Progress | LineProgress:
    """The progress display of :func:`tunelab.training.loop.fit`: a rich bar on a terminal, else lines.

    Both offer the part of rich's ``Progress`` the loop uses: a context manager with ``add_task``,
    ``update(task, advance=, info=)`` and ``console``.
    """
    console = console or Console()
    if quiet or console.is_terminal:
        return Progress(
            TextColumn("[bold blue]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), disable=quiet,
            console=console,
        )
    return LineProgress(console)


class LineProgress:
    """Plain progress lines for output that is not a terminal (see the module docstring)."""

    def __init__(self, console: Console, every_s: float = LINE_EVERY_S):
        self.console, self.every_s = console, every_s
        self.total = self.completed = self.start_step = 0
        self.started = self.last_line = 0.0

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, description: str, *, total: int, completed: int = 0, **fields: Any) -> int:
        """Start counting at ``completed`` of ``total`` steps (a resumed run starts past 0)."""
        self.total, self.completed, self.start_step = total, completed, completed
        self.started = self.last_line = time.monotonic()
        self.every_steps = max(1, math.ceil(total / LINES_PER_RUN))
        return 0

    def update(self, task: int, *, advance: int = 0, info: str = "", **fields: Any) -> None:
        """Count ``advance`` steps; print a line when one is due (``info``: loss, lr, tokens/s)."""
        self.completed += advance
        now = time.monotonic()
        done = self.completed - self.start_step
        due = (done == 1 or self.completed == self.total or self.completed % self.every_steps == 0
               or now - self.last_line >= self.every_s)
        if not advance or not due:
            return
        self.last_line = now
        elapsed = now - self.started
        eta = elapsed / done * (self.total - self.completed) if done else 0.0
        percent = 100 * self.completed / self.total if self.total else 100.0
        self.console.print(f"step {self.completed}/{self.total} ({percent:.0f}%)  {info}  elapsed "
                           f"{_clock(elapsed)}  eta {_clock(eta)}", highlight=False, markup=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
