"""Drug-review classification: TF-IDF + logistic-regression baseline vs tunelab runs, on the same split.

Train on ``builtin:drugreview`` train (600 reviews), report accuracy and macro-F1 on its test split
(379 reviews). The baseline's hyperparameters (n-grams, C, class weights) are chosen by 5-fold
stratified cross-validation on the training reviews only (macro-F1), so it is a tuned baseline,
not a straw man. tunelab runs are trained from their configs (they hold out 15% of train for
best-step selection) and evaluated with ``tunelab eval`` on the test split.

    flock /tmp/tunelab-cpu.lock .venv/bin/python -m bench.classify_baseline \\
        --train configs/classify/drug-review-minilm.yaml configs/classify/drug-review-smollm2-lora.yaml

writes ``bench/results/classification.md`` (and ``.json``); text under ``## Notes`` in an existing
file is kept. ``--runs DIR ...`` evaluates finished runs without training them again.

Other built-in sets: ``--data builtin:cuad-clauses --out bench/results/legal-clauses.md`` (train on its
``train`` split, report on ``test``). Every row carries 95 % bootstrap intervals (2,000 resamples of
the test examples) of accuracy and macro-F1, and tunelab rows the paired bootstrap interval of their
difference to the baseline, so a gap can be read against the noise of one test split.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "classification.md"
DATA = "builtin:drugreview"


def bootstrap(gold: list[str], pred: list[str], other: list[str] | None = None, *, samples: int = 2000,
              seed: int = 0) -> dict[str, list[float]]:
    """95 % percentile bootstrap intervals of accuracy and macro-F1 over resampled test examples.

    With ``other`` (another model's predictions on the same examples), also the intervals of the
    paired differences ``metric(pred) - metric(other)`` on the same resamples.
    """
    import numpy as np
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(seed)
    gold_a, pred_a = np.asarray(gold), np.asarray(pred)
    other_a = None if other is None else np.asarray(other)
    labels = sorted(set(gold))
    stats: dict[str, list[float]] = {"accuracy": [], "macro_f1": [], "accuracy_diff": [], "macro_f1_diff": []}
    for _ in range(samples):
        idx = rng.integers(0, len(gold_a), len(gold_a))
        g, p = gold_a[idx], pred_a[idx]
        acc, f1 = float((g == p).mean()), f1_score(g, p, average="macro", labels=labels, zero_division=0)
        stats["accuracy"].append(acc)
        stats["macro_f1"].append(f1)
        if other_a is not None:
            o = other_a[idx]
            stats["accuracy_diff"].append(acc - float((g == o).mean()))
            stats["macro_f1_diff"].append(f1 - f1_score(g, o, average="macro", labels=labels, zero_division=0))
    return {k: [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)]
            for k, v in stats.items() if v}


def baseline(seed: int = 0, data: str = DATA, train: list[dict[str, Any]] | None = None,
             test: list[dict[str, Any]] | None = None, text_of: Any = None) -> dict[str, Any]:
    """Fit the cross-validated TF-IDF + logistic regression on train; metrics on test.

    ``train``/``test``: labelled records (default: the ``train``/``test`` splits of built-in ``data``);
    ``text_of(record)`` gives the text to classify (default: its ``text``); labels are ``record["label"]``.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import Pipeline

    from tunelab.data.builtin import load_builtin

    if train is None or test is None:
        name = data.removeprefix("builtin:")
        train, test = load_builtin(name, None, "train"), load_builtin(name, None, "test")
    text_of = text_of or (lambda r: r["text"])
    pipe = Pipeline([("tfidf", TfidfVectorizer(sublinear_tf=True, min_df=2, strip_accents="unicode")),
                     ("lr", LogisticRegression(max_iter=5000))])
    grid = {"tfidf__ngram_range": [(1, 1), (1, 2)], "lr__C": [0.3, 3.0, 30.0],
            "lr__class_weight": [None, "balanced"]}
    search = GridSearchCV(pipe, grid, scoring="f1_macro", cv=StratifiedKFold(5, shuffle=True, random_state=seed),
                          n_jobs=1)
    started = time.perf_counter()
    search.fit([text_of(r) for r in train], [r["label"] for r in train])
    seconds = time.perf_counter() - started
    pred = search.predict([text_of(r) for r in test])
    gold = [r["label"] for r in test]
    names = sorted({r["label"] for r in train} | set(gold))
    return {"name": "TF-IDF + logistic regression (scikit-learn, CV-tuned)", "accuracy": accuracy_score(gold, pred),
            "predictions": list(pred), "gold": gold, "ci95": bootstrap(gold, list(pred)),
            "num_train": len(train), "num_test": len(test),
            "macro_f1": f1_score(gold, pred, average="macro"), "train_seconds": round(seconds, 1),
            "detail": f"best params {search.best_params_}, CV macro-F1 {search.best_score_:.4f} "
                      f"(grid search incl. refit, {len(train)} train records)",
            "labels": names, "confusion_matrix": confusion_matrix(gold, pred, labels=names).tolist()}


def train_config(config: str) -> str:
    """Run ``tunelab train CONFIG --overwrite``; returns the run directory."""
    from tunelab.config.load import load_config

    subprocess.run([str(Path(sys.executable).with_name("tunelab")), "train", config, "--overwrite"], check=True)
    return load_config(config).output_dir


def tunelab_result(run_dir: str, data: str = DATA, base: dict[str, Any] | None = None,
                   split: str = "test") -> dict[str, Any]:
    """``split`` metrics of a finished run on ``data`` plus its training time from ``tunelab.json``; with
    ``base`` (the baseline's result on the same split), paired bootstrap intervals of the difference."""
    import tempfile

    from tunelab.cli.classify_cmds import evaluate_run, predict_run

    info = json.loads((Path(run_dir) / "tunelab.json").read_text())
    res = info["results"]
    metrics = evaluate_run(Path(run_dir), data, split=split, batch_size=32)
    with tempfile.TemporaryDirectory() as tmp:
        predict_run(Path(run_dir), data, Path(tmp) / "p.jsonl", split=split, batch_size=32)
        pred = [json.loads(line)["prediction"] for line in (Path(tmp) / "p.jsonl").read_text().split("\n") if line]
    ci = bootstrap(base["gold"], pred, base["predictions"]) if base else {}
    return {"name": f"tunelab {info['base_model']} ({info['method']}), `{run_dir}`", "run": run_dir,
            "ci95": ci, "predictions": pred,
            "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "train_seconds": res["fit_seconds"],
            "per_class_f1": {k: round(v["f1"], 4) for k, v in metrics["per_class"].items()},
            "confusion_matrix": metrics["confusion_matrix"], "labels": metrics.get("labels"),
            "detail": (f"{res['steps']} steps, best step {res['best_step']} by held-out {res['metric_for_best']} "
                       f"{res['held_out_best'][res['metric_for_best']]:.4f}" if res.get("best_step") is not None
                       else f"{res['steps']} steps on all {res['train']['examples']} training reviews, final weights "
                            "(no held-out split)")
                      + f"; whole command {res['train_seconds']} s"
                      + (f"; head from a linear probe (C={res['linear_probe']['C']}, {res['linear_probe']['seconds']} s; "
                         f"held-out before fine-tuning: accuracy {res['held_out_before']['accuracy']:.4f}, macro-F1 "
                         f"{res['held_out_before']['macro_f1']:.4f})" if res.get("linear_probe") and res.get("held_out_before")
                         else "")}


def environment() -> dict[str, str]:
    """Versions and hardware the numbers were measured with."""
    import sklearn
    import torch
    import transformers

    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load average (1/5/15 min)": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
            "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "scikit-learn": sklearn.__version__,
            "cpu": f"{os.cpu_count()} logical cores visible (runs use train.threads: 2; shared machine)",
            "platform": platform.platform()}


def _ci(r: dict[str, Any], key: str) -> str:
    ci = r.get("ci95", {}).get(key)
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def write_markdown(rows: list[dict[str, Any]], env: dict[str, str], path: Path, data: str = DATA) -> None:
    """Results table + environment; keeps an existing ``## Notes`` section."""
    notes = ""
    if path.is_file() and "## Notes" in path.read_text():
        notes = path.read_text()[path.read_text().index("## Notes"):]
    from collections import Counter

    counts = ", ".join(f"{k} {v}" for k, v in sorted(Counter(rows[0]["gold"]).items(), key=lambda kv: -kv[1]))
    lines = [f"# `{data}` classification: tunelab vs TF-IDF baseline", "",
             f"Data: `{data}`, train {rows[0]['num_train']} / **test {rows[0]['num_test']}** ({counts}). Metrics on "
             "the test split with 95 % bootstrap intervals in brackets (2,000 resamples of the test examples); "
             "Δ = paired bootstrap interval of the difference to the baseline. Train time = training loop incl. "
             "held-out evaluations (baseline: the whole grid search).", "",
             "Command: `flock /tmp/tunelab-cpu.lock python -m bench.classify_baseline "
             + " ".join(sys.argv[1:]) + f"` (runs evaluated with `tunelab eval RUN --data {data} "
             "--split test`)", "",
             "| model | test accuracy | test macro-F1 | train time (s, 2 threads) | notes |", "|---|---|---|---|---|"]
    for r in rows:
        delta = (f"Δ accuracy{_ci(r, 'accuracy_diff')}, Δ macro-F1{_ci(r, 'macro_f1_diff')}; "
                 if "accuracy_diff" in r.get("ci95", {}) else "")
        lines.append(f"| {r['name']} | {r['accuracy']:.4f}{_ci(r, 'accuracy')} | {r['macro_f1']:.4f}{_ci(r, 'macro_f1')} | "
                     f"{r['train_seconds']} | {delta}"
                     f"{r['detail']}{'; per-class F1 ' + json.dumps(r['per_class_f1']) if 'per_class_f1' in r else ''} |")
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + ("\n" + notes if notes else ""))


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", nargs="*", default=[], help="configs to train, then evaluate")
    parser.add_argument("--runs", nargs="*", default=[], help="finished run directories to evaluate")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--data", default=DATA, help="a builtin:NAME with train and test splits")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    rows = [baseline(data=args.data)]
    print(f"baseline: accuracy {rows[0]['accuracy']:.4f} macro-F1 {rows[0]['macro_f1']:.4f}", flush=True)
    for run_dir in [train_config(c) for c in args.train] + list(args.runs):
        rows.append(tunelab_result(run_dir, args.data, rows[0]))
        print(f"{run_dir}: accuracy {rows[-1]['accuracy']:.4f} macro-F1 {rows[-1]['macro_f1']:.4f}", flush=True)
    env = environment()
    write_markdown(rows, env, args.out, args.data)
    args.out.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
