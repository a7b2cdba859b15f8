"""Console reports shared by recipes."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_side_by_side(console: Console, samples: list[dict[str, Any]], title: str, first_column: str) -> None:
    """A table of held-out prompts with the starting and fine-tuned model's answers.

    Args:
        samples: dicts with ``prompt``, ``before`` (may be None) and ``after`` texts.
    """
    if not samples:
        return
    table = Table(title=title, show_lines=True)
    for col in (first_column, "before", "after"):
        table.add_column(col, ratio=1)
    for s in samples:
        table.add_row(s["prompt"], s["before"] or "-", s["after"])
    console.print(table)
