"""The medical applications (issue 18), measured: MedQuAD SFT and PubMedQA yes/no/maybe classification.

    python -m bench.medical medquad  [--config configs/medical/medquad-sft.yaml]
    python -m bench.medical pubmedqa [--train CONFIG ...] [--runs RUN ...]

``medquad`` trains the SFT config (``tunelab train CONFIG --overwrite``) and writes
``bench/results/medquad-sft.md`` (+ ``.json``): held-out loss/perplexity before and after (held out by
document, see :mod:`tunelab.data.builtin_medquad`) and the held-out answers side by side, read from
the run's ``tunelab.json``.

``pubmedqa`` scores, on the ``builtin:pubmedqa`` test split (300 questions, stratified by label), the
majority class of train, the CV-tuned TF-IDF + logistic regression of :mod:`bench.classify_baseline`
(on question + abstract), and each tunelab run (trained from ``--train`` configs or given as
``--runs``), with 95% intervals (Wilson for accuracy, bootstrap for macro-F1, from each confusion
matrix: :mod:`tunelab.eval.intervals`). Writes ``bench/results/pubmedqa.md`` (+ ``.json``).

Every result file records the command, the UTC date and time, the wall time and the load average
(the machine is shared: read CPU times as upper bounds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.classify_baseline import baseline, environment, tunelab_result

RESULTS = Path(__file__).parent / "results"
PUBMEDQA = "builtin:pubmedqa"


def load_average() -> str:
    """The 1/5/15-minute load averages (``/proc/loadavg``), or ``n/a`` off Linux."""
    path = Path("/proc/loadavg")
    return " ".join(path.read_text().split()[:3]) if path.is_file() else "n/a"


def run_train(config: str) -> tuple[str, float, str, str, float]:
    """``tunelab train CONFIG --overwrite``; returns (output_dir, wall s, load before, load after, CPU s).

    Also prints the child's CPU time (user + system, s): on a busy shared machine, CPU time / 2 estimates
    the wall time on an idle 2-core one (an over-estimate: oversubscribed threads spin).
    """
    import resource

    from tunelab.config.load import load_config

    load_before, started = load_average(), time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-m", "tunelab", "train", config, "--overwrite"], check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    print(f"{config}: wall {time.perf_counter() - started:.1f} s, CPU {cpu_s:.1f} s", flush=True)
    return (load_config(config).output_dir, round(time.perf_counter() - started, 1), load_before, load_average(),
            round(cpu_s, 1))


def header(title: str, wall_s: float, load_before: str, load_after: str) -> list[str]:
    """Title, command, date, wall time and load average lines of a result file."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [f"# {title}", "", f"Command: `python -m bench.medical {' '.join(sys.argv[1:])}`  ", f"Finished: {now}; "
            f"wall time of the whole command {wall_s} s; load average (1/5/15 min) {load_before} at the start, "
            f"{load_after} at the end (shared 2-core machine, load above 2 means other jobs competed).", ""]


def medquad(config: str, out: Path) -> dict[str, Any]:
    """Train the MedQuAD SFT config and write its before/after report."""
    started = time.perf_counter()
    run_dir, train_s, load_before, load_after, cpu_s = run_train(config)
    info = json.loads((Path(run_dir) / "tunelab.json").read_text())
    res = info["results"]
    before, after = res["held_out_before"], res["held_out_after"]
    lines = header("MedQuAD medical Q/A assistant: SmolLM2-135M-Instruct + LoRA SFT",
                   round(time.perf_counter() - started, 1), load_before, load_after)
    lines += [f"Config `{config}` → run `{run_dir}` (`tunelab train` took {train_s} s wall, {cpu_s} s CPU, "
              f"{res['steps']} optimizer steps). "
              f"Train: {res['train']}.", "",
              "Held out by document (no document, focus or question text of the held-out split is in train).", "",
              "| held-out | loss (nats/token) | perplexity | token accuracy |", "|---|---|---|---|"]
    for name, m in (("before (base model)", before), ("after SFT", after)):
        if m:
            accuracy = m.get("token_accuracy", float("nan"))
            lines.append(f"| {name} | {m['loss']:.4f} | {m['ppl']:.2f} | {accuracy:.4f} |")
    if before and after:
        lines.append(f"| change | {after['loss'] - before['loss']:+.4f} | {after['ppl'] / before['ppl']:.2f}× | |")
    lines += ["", "## Held-out questions: base model vs fine-tuned (greedy)", ""]
    for s in res["samples"]:
        lines += [f"**Q:** {s['prompt']}", "", f"- before: {_one_line(s['before'])}",
                  f"- after: {_one_line(s['after'])}", ""]
    _write(out, lines, {"config": config, "run": run_dir, "train_wall_s": train_s, "train_cpu_s": cpu_s,
                        "load_before": load_before, "load_after": load_after, "results": res})
    return res


def pubmedqa(configs: list[str], runs: list[str], out: Path) -> list[dict[str, Any]]:
    """Majority class, TF-IDF + LR and tunelab runs on the PubMedQA test split, with 95% intervals."""
    from tunelab.data.builtin import load_builtin
    from tunelab.eval.intervals import classification_intervals

    started, load_before = time.perf_counter(), load_average()
    train, test = load_builtin("pubmedqa", None, "train"), load_builtin("pubmedqa", None, "test")
    rows = [majority(train, test), baseline(train=train, test=test, text_of=question_and_context)]
    rows[1]["name"] = "TF-IDF + logistic regression on question + abstract (scikit-learn, CV-tuned)"
    timings = {}
    for config in configs:
        run_dir, seconds, _, _, cpu_s = run_train(config)
        runs.append(run_dir)
        timings[run_dir] = f"{seconds} s wall, {cpu_s} s CPU"
    for run_dir in runs:
        rows.append(tunelab_result(run_dir, PUBMEDQA, split="test"))
        if run_dir in timings:
            rows[-1]["detail"] += f"; `tunelab train` {timings[run_dir]}"
    for row in rows:
        row.update(classification_intervals(row["confusion_matrix"]))
        print(f"{row['name']}: accuracy {row['accuracy']:.4f} macro-F1 {row['macro_f1']:.4f}", flush=True)
    counts = dict(Counter(r["label"] for r in test))
    lines = header("PubMedQA (PQA-L) yes/no/maybe from question + abstract", round(time.perf_counter() - started, 1),
                   load_before, load_average())
    lines += [f"Data: `{PUBMEDQA}` (1,000 expert-labelled questions), split by PMID stratified by label: train "
              f"{len(train)} / **test {len(test)}** {counts}. tunelab configs hold out 15% of train (stratified) to "
              "pick the best step; the baselines train on all of train. 95% intervals: Wilson (accuracy), "
              "percentile bootstrap of the confusion matrix, 2,000 resamples (macro-F1).", "",
              "| model | test accuracy (95% CI) | test macro-F1 (95% CI) | train time (s) | notes |",
              "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['accuracy']:.3f} ({r['accuracy_low']:.3f}–{r['accuracy_high']:.3f}) | "
                     f"{r['macro_f1']:.3f} ({r['macro_f1_low']:.3f}–{r['macro_f1_high']:.3f}) | "
                     f"{r['train_seconds']} | "
                     f"{r['detail']}; confusion (rows true {r['labels']}) {r['confusion_matrix']} |")
    env = environment()
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    _write(out, lines, {"environment": env, "results": rows})
    return rows


def majority(train: list[dict[str, Any]], test: list[dict[str, Any]]) -> dict[str, Any]:
    """Always predict the most frequent training label."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    label = Counter(r["label"] for r in train).most_common(1)[0][0]
    gold, pred = [r["label"] for r in test], [label] * len(test)
    names = sorted({r["label"] for r in train} | set(gold))
    return {"name": f"majority class ('{label}')", "accuracy": accuracy_score(gold, pred),
            "macro_f1": f1_score(gold, pred, average="macro", labels=names, zero_division=0), "train_seconds": 0,
            "detail": f"most frequent label of the {len(train)} train records", "labels": names,
            "confusion_matrix": confusion_matrix(gold, pred, labels=names).tolist()}


def question_and_context(record: dict[str, Any]) -> str:
    """What the classifiers read: the question, a blank line, the abstract without its conclusion."""
    return f"{record['question']}\n\n{record['context']}"


def _one_line(text: str | None) -> str:
    return " ".join((text or "-").split()).replace("|", "\\|")


def _write(path: Path, lines: list[str], payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="task", required=True)
    mq = sub.add_parser("medquad", help="train the MedQuAD SFT config and report before/after")
    mq.add_argument("--config", default="configs/medical/medquad-sft.yaml")
    mq.add_argument("--out", type=Path, default=RESULTS / "medquad-sft.md")
    pq = sub.add_parser("pubmedqa", help="PubMedQA baselines vs tunelab classifiers")
    pq.add_argument("--train", nargs="*", default=[], help="configs to train, then evaluate")
    pq.add_argument("--runs", nargs="*", default=[], help="finished run directories to evaluate")
    pq.add_argument("--out", type=Path, default=RESULTS / "pubmedqa.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    if args.task == "medquad":
        medquad(args.config, args.out)
    else:
        pubmedqa(args.train, list(args.runs), args.out)


if __name__ == "__main__":
    main()
