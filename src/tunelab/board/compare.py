"""What the board's curves and compare views show, as plain tables (no web code, testable alone).

* :func:`curve_frame`: one row per (run, metric, step) from ``metrics.jsonl``, for overlaid line plots;
* :func:`config_diff`: the dotted config keys whose values differ between runs;
* :func:`held_out_table` / :func:`samples_table`: the before/after held-out metrics and sample answers
  each run recorded in ``tunelab.json``, side by side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.training.trackers import flat_config, numeric_values

# What the live view offers first (the rest of a run's numbers follow in the menu).
MAIN_METRICS = ("loss", "eval/loss", "lr", "tokens_per_s", "reward/mean", "grad_norm")


def metric_names(records: list[dict[str, Any]]) -> list[str]:
    """Every numeric metric in ``records``: :data:`MAIN_METRICS` first, then the others sorted."""
    names = {k for r in records for k in numeric_values(r)}
    return [m for m in MAIN_METRICS if m in names] + sorted(names - set(MAIN_METRICS))


def curve_frame(curves: dict[str, list[dict[str, Any]]], metrics: list[str]):
    """A long pandas DataFrame with columns ``step`` (int), ``value`` (float), ``metric``, ``run`` and
    ``series`` (``run · metric``), one row per logged point of each run's ``metrics``."""
    import pandas as pd

    rows = []
    for run, records in curves.items():
        for record in records:
            values = numeric_values(record)
            for metric in metrics:
                if metric in values and "step" in record:
                    rows.append({"step": int(record["step"]), "value": values[metric], "metric": metric,
                                 "run": run, "series": f"{run} · {metric}"})
    return pd.DataFrame(rows, columns=["step", "value", "metric", "run", "series"])


def config_diff(configs: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Rows ``[key, value in run 1, value in run 2, ...]`` for every dotted key whose values differ
    (``output_dir`` included: it names the runs); a key one run lacks shows ``<unset>``."""
    import yaml

    flat = {run: flat_config(yaml.safe_dump(config)) for run, config in configs.items()}
    keys = sorted({k for values in flat.values() for k in values})
    rows = []
    for key in keys:
        values = [flat[run].get(key, "<unset>") for run in configs]
        if len({json.dumps(v, default=str) for v in values}) > 1:
            rows.append([key, *(str(v) for v in values)])
    return rows


def run_results(run_dir: Path) -> dict[str, Any]:
    """``results`` of the run's ``tunelab.json`` (``{}`` before it is written)."""
    try:
        return json.loads((run_dir / "tunelab.json").read_text()).get("results") or {}
    except (OSError, ValueError):
        return {}


def held_out_table(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Rows ``[metric, run1 before, run1 after, run2 before, ...]`` from each run's ``held_out_before`` /
    ``held_out_after`` (RL runs: ``before``/``after`` held-out reward dicts)."""
    pairs = {run: _before_after(r) for run, r in results.items()}
    metrics = sorted({m for before, after in pairs.values() for m in (*before, *after)})
    rows = []
    for metric in metrics:
        row = [metric]
        for before, after in pairs.values():
            row += [_number(before.get(metric)), _number(after.get(metric))]
        rows.append(row)
    return rows


def samples_table(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Rows ``[prompt, starting model, run1 after, run2 after, ...]``: each held-out prompt's answers side
    by side (the starting model's from the first run that recorded one)."""
    answers: dict[str, dict[str, str]] = {}
    for run, r in results.items():
        for sample in r.get("samples") or []:
            entry = answers.setdefault(str(sample.get("prompt")), {})
            entry.setdefault("before", sample.get("before") or "")
            entry[run] = sample.get("after") or ""
    return [[prompt, entry.get("before", ""), *(entry.get(run, "") for run in results)]
            for prompt, entry in answers.items()]


def _before_after(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    for before_key, after_key in (("held_out_before", "held_out_after"), ("before", "after")):
        before, after = results.get(before_key), results.get(after_key)
        if isinstance(before, dict) or isinstance(after, dict):
            return _numbers(before), _numbers(after)
    return {}, {}


def _numbers(metrics: Any) -> dict[str, float]:
    return numeric_values(metrics) if isinstance(metrics, dict) else {}


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
