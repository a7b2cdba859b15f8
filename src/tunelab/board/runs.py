"""The runs under a directory, as ``tunelab board`` lists them: what each is and how far it got.

Read-only: nothing here writes into a run directory or takes its lock, so a running job is never
blocked or changed by a watcher. Status comes from the same places ``tunelab train`` decides it:

* **running**: a live process holds the run lock (:func:`tunelab.training.outputs.lock_holder`);
* **finished**: ``tunelab.json`` is written and no newer intact checkpoint exists
  (:func:`tunelab.training.checkpoint.run_finished`);
* **interrupted (resumable)**: not finished, with an intact checkpoint (its manifest matches,
  :func:`tunelab.training.manifest.manifest_problems`): ``tunelab train CONFIG --resume`` continues it;
* **failed**: neither (it stopped before its first checkpoint, or every checkpoint is damaged).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from tunelab.config.selection import higher_is_better
from tunelab.errors import TunelabError
from tunelab.training.checkpoint import run_finished
from tunelab.training.manifest import manifest_problems
from tunelab.training.metrics import read_new_records
from tunelab.training.outputs import lock_holder
from tunelab.training.resume import step_dirs

RUNNING, FINISHED, INTERRUPTED, FAILED = "running", "finished", "interrupted (resumable)", "failed"
BOARD_DIR = ".board"  # the board's own files under RUNS_DIR (launch logs); never a run
_INTACT: dict[tuple[str, float], bool] = {}  # (checkpoint, manifest mtime) -> intact: hash each once


@dataclass
class RunSummary:
    """One row of the runs table. ``wall_s`` seconds; ``best`` the best held-out value of ``best_metric``."""

    name: str
    task: str
    base_model: str
    method: str
    status: str
    steps: int
    planned_steps: int | None
    wall_s: float | None
    best_metric: str | None
    best: float | None
    best_step: int | None

    def row(self) -> dict[str, Any]:
        """The table row (wall time as h:mm:ss, best as ``value @ step``)."""
        out = asdict(self)
        out["steps"] = f"{self.steps}/{self.planned_steps}" if self.planned_steps else str(self.steps)
        out["wall_s"] = _clock(self.wall_s)
        out["best"] = f"{self.best:.4f} @ {self.best_step}" if self.best is not None else ""
        out.pop("planned_steps"), out.pop("best_step")
        return out


def inside(runs_dir: Path, path: str | Path) -> Path:
    """``path`` (relative to ``runs_dir`` or absolute) resolved, if it lies in ``runs_dir``.

    Raises:
        TunelabError: it resolves outside ``runs_dir`` (``..``, an absolute path elsewhere, a symlink out).
    """
    root = runs_dir.resolve()
    candidate = Path(path)
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if resolved != root and root not in resolved.parents:
        raise TunelabError(f"{path}: outside the board's runs directory {root}; refused")
    return resolved


def find_runs(runs_dir: Path) -> list[Path]:
    """Every run directory under ``runs_dir`` (one holding ``config.yaml`` or ``metrics.jsonl``), sorted;
    not the board's own ``.board/``, not a run's ``checkpoints/``, and nothing inside another run (a
    tracker's copy of the config, e.g. MLflow's ``mlruns/<exp>/<run>/artifacts/config.yaml``)."""
    found: set[Path] = set()
    for marker in ("config.yaml", "metrics.jsonl"):
        for path in runs_dir.rglob(marker):
            run = path.parent
            parts = run.relative_to(runs_dir).parts
            if BOARD_DIR not in parts and "checkpoints" not in parts:
                found.add(run)
    return sorted(run for run in found if not any(parent in found for parent in run.parents))


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config: ``config.yaml``, else the newest checkpoint's (a run still in its first
    steps has only that); ``{}`` when none is readable."""
    candidates = [run_dir / "config.yaml"] + [p / "config.yaml" for p in reversed(step_dirs(run_dir))]
    for path in candidates:
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(raw, dict):
            return raw
    return {}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete, well-formed record of ``metrics.jsonl`` (read-only; a half-written last line and
    records that are not objects with an integer ``step`` are left out, see :func:`well_formed`)."""
    return well_formed(read_new_records(run_dir / "metrics.jsonl")[0])


def well_formed(records: list[Any]) -> list[dict[str, Any]]:
    """The records a curve can use: JSON objects whose ``step`` (if any) is an integer."""
    return [r for r in records if isinstance(r, dict)
            and ("step" not in r or (isinstance(r["step"], int) and not isinstance(r["step"], bool)))]


def run_status(run_dir: Path) -> str:
    """:data:`RUNNING`, :data:`FINISHED`, :data:`INTERRUPTED` or :data:`FAILED` (see the module docstring)."""
    if lock_holder(run_dir) is not None:
        return RUNNING
    newest = next((p for p in reversed(step_dirs(run_dir)) if _intact(p)), None)
    if (run_dir / "tunelab.json").is_file():
        if newest is None or run_finished(run_dir, int(newest.name[5:])) or not _newer(newest, run_dir / "tunelab.json"):
            return FINISHED
    return INTERRUPTED if newest is not None else FAILED


def summarize(run_dir: Path, runs_dir: Path) -> RunSummary:
    """The runs-table row of ``run_dir``; a run whose files cannot be read (wrong types in ``config.yaml``
    or ``tunelab.json``) gets a row saying so, so one damaged run never hides the others."""
    try:
        return _summarize(run_dir, runs_dir)
    except (TypeError, ValueError, AttributeError, KeyError, OSError) as err:
        return RunSummary(name=str(run_dir.relative_to(runs_dir)), task="?", base_model="?", method="?",
                          status=f"unreadable ({type(err).__name__}: {err})", steps=0, planned_steps=None,
                          wall_s=None, best_metric=None, best=None, best_step=None)


def _summarize(run_dir: Path, runs_dir: Path) -> RunSummary:
    config, records = read_config(run_dir), read_metrics(run_dir)
    info = _run_info(run_dir)
    train = config.get("train") or {}
    status = run_status(run_dir)
    steps = max((int(r.get("step", 0)) for r in records), default=0)
    metric, best, best_step = best_held_out(records, train.get("metric_for_best"))
    return RunSummary(
        name=str(run_dir.relative_to(runs_dir)), task=str(config.get("task", info.get("task_type", "?"))),
        base_model=str((config.get("model") or {}).get("name_or_path") or info.get("base_model") or "?"),
        method=_method(config, info), status=status, steps=steps, planned_steps=train.get("max_steps"),
        wall_s=_wall_seconds(run_dir, records, info, status), best_metric=metric, best=best, best_step=best_step,
    )


def best_held_out(records: list[dict[str, Any]], metric: str | None) -> tuple[str | None, float | None, int | None]:
    """``(metric, best value, its step)`` over the ``eval/`` records: ``train.metric_for_best`` if set,
    else ``loss``, else the first held-out metric logged; better = higher or lower as the metric says."""
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not evals:
        return metric, None, None
    names = [k.removeprefix("eval/") for k in evals[0] if k.startswith("eval/")]
    metric = metric if metric else ("loss" if "loss" in names else names[0])
    scored = [(float(r[f"eval/{metric}"]), int(r.get("step", 0))) for r in evals
              if isinstance(r.get(f"eval/{metric}"), (int, float))]
    if not scored:
        return metric, None, None
    higher = higher_is_better(metric)
    value, step = max(scored, key=lambda s: s[0]) if higher else min(scored, key=lambda s: s[0])
    return metric, value, step


def _intact(checkpoint: Path) -> bool:
    try:
        key = (str(checkpoint), (checkpoint / "manifest.json").stat().st_mtime)
    except OSError:
        return False  # no manifest yet: being written, or damaged
    if key not in _INTACT:
        _INTACT[key] = not manifest_problems(checkpoint)
    return _INTACT[key]


def _newer(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_mtime > b.stat().st_mtime
    except OSError:
        return False


def _run_info(run_dir: Path) -> dict[str, Any]:
    try:
        info = json.loads((run_dir / "tunelab.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _method(config: dict[str, Any], info: dict[str, Any]) -> str:
    method = str((config.get("train") or {}).get("method") or info.get("method") or "?")
    loss = (config.get("preference") or {}).get("loss")
    return f"{method} ({loss})" if config.get("task") == "dpo" and loss else method


def _wall_seconds(run_dir: Path, records: list[dict[str, Any]], info: dict[str, Any], status: str) -> float | None:
    """Finished: the run's own ``train_seconds``; running: since the lock was taken; else the steps' sum."""
    seconds = (info.get("results") or {}).get("train_seconds")
    if status == FINISHED and isinstance(seconds, (int, float)):
        return float(seconds)
    holder = lock_holder(run_dir) if status == RUNNING else None
    if holder is not None:
        return time.time() - float(holder["started"])
    total = sum(float(r["step_s"]) for r in records if isinstance(r.get("step_s"), (int, float)))
    return total or None


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class MetricsFollower:
    """Each followed run's ``metrics.jsonl`` records, read incrementally as the file grows.

    Only the bytes added since the last call are read (:func:`tunelab.training.metrics.read_new_records`);
    a file replaced since (``--resume`` rewrites it without the steps past its checkpoint, ``--overwrite``
    starts it again) is read again from the start.
    """

    def __init__(self) -> None:
        self._state: dict[Path, tuple[int, int, list[dict[str, Any]]]] = {}  # path -> (inode, offset, records)

    def records(self, run_dir: Path) -> list[dict[str, Any]]:
        """All complete records of ``run_dir``'s metrics so far."""
        path = run_dir / "metrics.jsonl"
        try:
            stat = path.stat()
        except OSError:
            self._state.pop(path, None)
            return []
        inode, offset, records = self._state.get(path, (stat.st_ino, 0, []))
        if inode != stat.st_ino or stat.st_size < offset:  # replaced or cut: read it again whole
            offset, records = 0, []
        new, offset = read_new_records(path, offset)
        records = records + well_formed(new)
        self._state[path] = (stat.st_ino, offset, records)
        return records
