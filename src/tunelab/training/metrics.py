"""Metrics sinks: one JSON object per line in ``metrics.jsonl`` (and the trackers of ``train.report_to``,
:mod:`tunelab.training.trackers`), its incremental reader, and a loss-curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Iterable
from typing import Any

from tunelab.training.outputs import atomic_file, writing


class MetricsLog:
    """Append-only JSONL metrics file. On resume, lines past the resumed step are dropped.

    Every record written also goes to the trackers of ``report_to`` (``train.report_to``), opened in
    ``path``'s directory with ``config_yaml`` (the resolved config) as their hyperparameters; this is
    the one place that writes metrics, so every recipe (PPO and GRPO included) reports them.

    Raises:
        ConfigError: a ``report_to`` library is not installed (naming the extra).
    """

    def __init__(self, path: Path, resume_step: int | None = None, *, report_to: Iterable[str] = (),
                 config_yaml: str = ""):
        self.path = path
        self.trackers: list[Any] = []
        with writing(path):  # a full disk or read-only directory: one error naming the file
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                path.write_text("")
            elif path.exists():
                kept = [line for line in path.read_text().split("\n")
                        if line and json.loads(line).get("step", 0) <= resume_step]
                with atomic_file(path) as tmp:
                    tmp.write_text("".join(line + "\n" for line in kept))
        if report_to:
            from tunelab.training.trackers import open_trackers

            self.trackers = open_trackers(report_to, path.parent, config_yaml, resume_step)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (values must be JSON-serializable).

        Raises:
            OutputError: the disk is full or the file cannot be written (naming it).
        """
        with writing(self.path), self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers:
            from tunelab.training.trackers import numeric_values

            values = numeric_values(record)
            for tracker in self.trackers:
                tracker.log(values, int(record.get("step", 0)))

    def close(self) -> None:
        """Finish the tracker runs (each once; the JSONL file needs no closing)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()

    def read(self) -> list[dict[str, Any]]:
        """All records so far."""
        return [json.loads(line) for line in self.path.read_text().split("\n") if line]


def read_new_records(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The complete records of a ``metrics.jsonl`` that may still be growing, from byte ``offset`` on.

    Read-only (opened ``rb``, no lock taken), so a running job is never blocked or changed. A last
    line without its newline (being written right now) is left for the next call.

    Returns:
        ``(records, next_offset)``: pass ``next_offset`` back to read only what was added since. A file
        that shrank below ``offset`` (the run was restarted or resumed) is read again from the start.
        A missing file gives ``([], 0)``.
    """
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            if f.tell() < offset:
                offset = 0
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], 0
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a kill -9 mid-write: skipped, as --resume drops it
    return records, offset + end


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
