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


def per_class_table(per_class: dict[str, dict[str, Any]], title: str) -> Table:
    """Precision, recall, F1 and support per label (a classification metrics' per-class entry)."""
    table = Table(title=title)
    for col in ("label", "precision", "recall", "f1", "support"):
        table.add_column(col)
    for name, m in per_class.items():
        table.add_row(name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    return table
