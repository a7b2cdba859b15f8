"""``tunelab eval`` and ``tunelab predict`` for classification runs.

Both read the run's own ``classification`` settings (text/pair/label fields, label names,
threshold) from its saved ``config.yaml`` and ``tunelab.json``; ``--data`` is any source a
config accepts (local .json/.jsonl/.csv/.parquet, ``builtin:NAME`` with ``--split``, a hub id).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from tunelab.cli.output_files import OverwriteOutOpt, atomic_file, check_out_file

RunArg = Annotated[Path, typer.Argument(help="A finished classification run directory.")]
DataOpt = Annotated[str, typer.Option("--data", help="Data file, builtin:NAME or hub id.")]
SplitOpt = Annotated[str, typer.Option(help="Split for builtin/hub data.")]
BatchOpt = Annotated[int, typer.Option(help="Examples per forward pass.")]


def register(app: typer.Typer, console: Console) -> None:
    """Add the ``eval`` and ``predict`` commands to the ``tunelab`` app."""

    @app.command("eval")
    def eval_command(
        run_dir: RunArg, data: DataOpt, split: SplitOpt = "train", batch_size: BatchOpt = 16,
        out: Annotated[Optional[Path], typer.Option(help="Write metrics JSON here (+ confusion PNG beside).")] = None,
        overwrite: Annotated[bool, typer.Option(help="Replace --out and its PNG if they exist.")] = False,
    ) -> None:
        """Metrics of a classification run on any labelled data: accuracy, F1, per class, confusion matrix."""
        metrics = evaluate_run(run_dir, data, split=split, batch_size=batch_size, out=out, overwrite=overwrite)
        print_metrics(console, metrics, title=f"{run_dir} on {data}" + (f" (split {split})" if split != "train" else ""))
        if out:
            console.print(f"[bold green]wrote[/] {out}")

    @app.command("predict")
    def predict_command(
        run_dir: RunArg, data: DataOpt,
        out: Annotated[Path, typer.Option(help="Output JSONL: each record + label and probabilities.")],
        split: SplitOpt = "train", batch_size: BatchOpt = 16,
        overwrite: OverwriteOutOpt = False,
    ) -> None:
        """Label new texts: writes each input record with ``prediction`` and per-label ``probabilities``."""
        count = predict_run(run_dir, data, out, split=split, batch_size=batch_size, overwrite=overwrite)
        console.print(f"[bold green]wrote[/] {count} predictions to {out}")


def _prepare(run_dir: Path, data: str, split: str, labelled: bool, batch_size: int):
    from tunelab.config.schema import DataSource
    from tunelab.data.classification import collate_classification, tokenize_records
    from tunelab.data.sources import load_records
    from tunelab.errors import DataError
    from tunelab.eval.classification import load_classification_run

    model, tokenizer, config, labels = load_classification_run(run_dir)
    records = load_records(DataSource(path=data, split=split))
    if not records:
        raise DataError(f"{data}: no records")
    examples, _ = tokenize_records(records, tokenizer, config.classification, labels if labelled else None,
                                   max_seq_len=config.data.max_seq_len, overlong="truncate", where=data)
    batches = [collate_classification(examples[i : i + batch_size], tokenizer.pad_token_id)
               for i in range(0, len(examples), batch_size)]
    return model, config, labels, records, batches


def evaluate_run(run_dir: Path, data: str, *, split: str = "train", batch_size: int = 16,
                 out: Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Metrics (see :mod:`tunelab.eval.classification`) of a run on labelled ``data``; optionally saved.

    ``out`` gets the metrics JSON and, for single-label runs, ``out`` with suffix ``.png`` the
    confusion matrix; neither may exist unless ``overwrite`` (see :mod:`tunelab.training.outputs`).
    """
    from tunelab.eval.classification import evaluate_classifier, plot_confusion_matrix
    from tunelab.training.precision import pick_device

    if out:
        check_out_file(out, overwrite=overwrite, inputs=[run_dir, data])
    device = pick_device()
    model, config, labels, _, batches = _prepare(run_dir, data, split, True, batch_size)
    if out and labels.problem_type == "single_label":
        check_out_file(out.with_suffix(".png"), overwrite=overwrite, inputs=[run_dir, data],
                       option="--out's confusion-matrix PNG")
    metrics = evaluate_classifier(model.to(device), batches, device, problem_type=labels.problem_type,
                                  names=labels.names, threshold=config.classification.threshold)
    metrics["num_examples"] = sum(b["num_examples"] for b in batches)
    if out:
        with atomic_file(out) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2))
        if "confusion_matrix" in metrics:
            with atomic_file(out.with_suffix(".png")) as tmp:
                plot_confusion_matrix(metrics["confusion_matrix"], labels.names, tmp,
                                      title=f"{Path(run_dir).name} on {Path(data).name} [{split}]")
    return metrics


def predict_run(run_dir: Path, data: str, out: Path, *, split: str = "train", batch_size: int = 16,
                overwrite: bool = False) -> int:
    """Write ``out`` (JSONL): each record plus ``prediction`` and ``probabilities`` (or ``values``).

    ``out`` may not exist unless ``overwrite``; it is written atomically (see :mod:`tunelab.training.outputs`).
    """
    from tunelab.eval.classification import prediction, predict_logits, probabilities
    from tunelab.training.precision import pick_device

    check_out_file(out, overwrite=overwrite, inputs=[run_dir, data])
    device = pick_device()
    model, config, labels, records, batches = _prepare(run_dir, data, split, False, batch_size)
    scores = probabilities(labels.problem_type, predict_logits(model.to(device), batches, device)).tolist()
    threshold = config.classification.threshold
    with atomic_file(out) as tmp, tmp.open("w", encoding="utf-8") as f:
        for record, row in zip(records, scores):
            f.write(json.dumps({**record, **prediction(labels.problem_type, labels.names, row, threshold)},
                               ensure_ascii=False, default=str) + "\n")
    return len(scores)


def print_metrics(console: Console, metrics: dict[str, Any], title: str) -> None:
    """Scalar metrics, then the per-class table and confusion matrix when present."""
    from tunelab.eval.classification import PER_CLASS, scalar_metrics
    from tunelab.eval.report import per_class_table

    console.print(f"[bold]{title}[/] ({metrics.get('num_examples', '?')} examples)")
    console.print("  ".join(f"{k} {v:.4f}" for k, v in scalar_metrics(metrics).items()))
    if PER_CLASS in metrics:
        console.print(per_class_table(metrics[PER_CLASS], "per class"))
    if "confusion_matrix" in metrics:
        table = Table(title="confusion matrix (rows: true, columns: predicted)")
        table.add_column("")
        for name in metrics["labels"]:
            table.add_column(name)
        for name, row in zip(metrics["labels"], metrics["confusion_matrix"]):
            table.add_row(name, *map(str, row))
        console.print(table)
