"""Metrics sinks: one JSON object per line in ``metrics.jsonl``, and a loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.training.outputs import atomic_file, writing


class MetricsLog:
    """Append-only JSONL metrics file. On resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        with writing(path):  # a full disk or read-only directory: one error naming the file
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                path.write_text("")
            elif path.exists():
                kept = [line for line in path.read_text().splitlines()
                        if line and json.loads(line).get("step", 0) <= resume_step]
                with atomic_file(path) as tmp:
                    tmp.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (values must be JSON-serializable).

        Raises:
            OutputError: the disk is full or the file cannot be written (naming it).
        """
        with writing(self.path), self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """All records so far."""
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def plot_loss_curve(records: list[dict[str, Any]], path: Path, title: str = "loss") -> None:
    """Train loss per optimizer step and eval loss where measured, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / supervised token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
