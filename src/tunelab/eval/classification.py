"""Evaluate a sequence classifier: batched head outputs, scikit-learn metrics, confusion-matrix PNG.

Metrics per problem type (all computed by scikit-learn from the same predictions):
  * single_label: ``accuracy``, ``macro_f1``, ``weighted_f1``, per-class precision/recall/F1/support,
    ``confusion_matrix`` (rows = true class, columns = predicted), ``roc_auc`` (binary: of the
    positive class' probability; multiclass: one-vs-rest macro average of softmax probabilities;
    only when every class occurs in the targets).
  * multi_label: ``subset_accuracy`` (all labels right), ``micro_f1``, ``macro_f1``, per-label
    P/R/F1/support, ``roc_auc`` (macro over labels having both outcomes). A label is on when its
    sigmoid probability ≥ ``threshold``.
  * regression: ``mse``, ``mae``, ``r2`` (averaged over targets).
``loss`` is the training loss on the same data (with its class weights), nats per example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tunelab.config.classification import HF_PROBLEM_TYPES
from tunelab.data.classification import LabelSpace
from tunelab.errors import TunelabError
from tunelab.losses.classification import classification_loss
from tunelab.models.heads import sequence_logits
from tunelab.training.precision import autocast

PER_CLASS = "per_class"
DETAIL_KEYS = (PER_CLASS, "confusion_matrix", "labels")


@torch.no_grad()
def predict_logits(model: nn.Module, batches: list[dict[str, Any]], device: torch.device,
                   precision: str = "fp32") -> torch.Tensor:
    """Head outputs of every example, in batch order: (N, K) float32 on CPU."""
    was_training = model.training
    model.eval()
    outputs = []
    for batch in batches:
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}
        with autocast(precision, device):
            outputs.append(sequence_logits(model, tensors).float().cpu())
    model.train(was_training)
    return torch.cat(outputs) if outputs else torch.zeros(0, 0)


def probabilities(problem_type: str, logits: torch.Tensor) -> torch.Tensor:
    """Softmax (single_label), sigmoid (multi_label) or the raw outputs (regression); (N, K)."""
    if problem_type == "single_label":
        return logits.softmax(dim=-1)
    if problem_type == "multi_label":
        return logits.sigmoid()
    return logits


def classification_metrics(problem_type: str, targets: np.ndarray, logits: np.ndarray, names: list[str],
                           threshold: float = 0.5) -> dict[str, Any]:
    """Metrics of predictions ``logits`` (N, K) against ``targets`` ((N,) ids or (N, K) values).

    Scalars are Python floats; ``per_class`` maps a label name to its precision/recall/f1/support,
    ``confusion_matrix`` is a K × K list of ints (single_label).
    """
    probs = probabilities(problem_type, torch.as_tensor(logits, dtype=torch.float32)).numpy()
    if problem_type == "regression":
        return _regression_metrics(np.asarray(targets, dtype=np.float64), np.asarray(logits, dtype=np.float64))
    if problem_type == "multi_label":
        return _multi_label_metrics(np.asarray(targets).astype(int), probs, names, threshold)
    return _single_label_metrics(np.asarray(targets).astype(int), probs, names)


def _single_label_metrics(y_true: np.ndarray, probs: np.ndarray, names: list[str]) -> dict[str, Any]:
    from sklearn import metrics as skm

    ids = list(range(len(names)))
    y_pred = probs.argmax(axis=1)
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=ids, zero_division=0)
    out: dict[str, Any] = {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=ids, average="macro", zero_division=0)),
        "weighted_f1": float(skm.f1_score(y_true, y_pred, labels=ids, average="weighted", zero_division=0)),
        PER_CLASS: _per_class(names, p, r, f, s),
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=ids).tolist(),
        "labels": list(names),
    }
    if set(np.unique(y_true)) == set(ids):
        out["roc_auc"] = float(skm.roc_auc_score(y_true, probs[:, 1]) if len(ids) == 2 else
                               skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=ids))
    return out


def _multi_label_metrics(y_true: np.ndarray, probs: np.ndarray, names: list[str], threshold: float) -> dict[str, Any]:
    from sklearn import metrics as skm

    y_pred = (probs >= threshold).astype(int)
    p, r, f, s = skm.precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    out: dict[str, Any] = {
        "subset_accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "micro_f1": float(skm.f1_score(y_true, y_pred, average="micro", zero_division=0)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0)),
        PER_CLASS: _per_class(names, p, r, f, s),
        "labels": list(names),
    }
    both = [k for k in range(y_true.shape[1]) if 0 < y_true[:, k].sum() < len(y_true)]
    if both:
        out["roc_auc"] = float(np.mean([skm.roc_auc_score(y_true[:, k], probs[:, k]) for k in both]))
    return out


def _regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    from sklearn import metrics as skm

    out = {"mse": float(skm.mean_squared_error(y_true, y_pred)), "mae": float(skm.mean_absolute_error(y_true, y_pred))}
    if len(y_true) > 1:
        out["r2"] = float(skm.r2_score(y_true, y_pred))
    return out


def _per_class(names, p, r, f, s) -> dict[str, dict[str, float]]:
    return {name: {"precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]), "support": int(s[k])}
            for k, name in enumerate(names)}


def evaluate_classifier(model: nn.Module, batches: list[dict[str, Any]], device: torch.device, *,
                        problem_type: str, names: list[str], threshold: float = 0.5,
                        class_weights: torch.Tensor | None = None, precision: str = "fp32") -> dict[str, Any]:
    """Loss and metrics of ``model`` on labelled batches (see :func:`classification_metrics`)."""
    logits = predict_logits(model, batches, device, precision)
    targets = torch.cat([b["labels"] for b in batches])
    loss, _ = classification_loss(problem_type, logits, targets, len(targets), class_weights)
    return {"loss": float(loss), **classification_metrics(problem_type, targets.numpy(), logits.numpy(), names,
                                                          threshold)}


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The float-valued metrics only (what goes into ``metrics.jsonl`` during training)."""
    return {k: v for k, v in metrics.items() if k not in DETAIL_KEYS and isinstance(v, float)}


def plot_confusion_matrix(matrix: list[list[int]], names: list[str], path: Path, title: str = "confusion matrix") -> None:
    """Write the K × K confusion matrix (rows true, columns predicted) as an annotated PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 1.1 * len(names) + 2))
    ax.imshow(data, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for (i, j), value in np.ndenumerate(data):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > data.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_classification_run(run_dir: str | Path) -> tuple[nn.Module, Any, Any, LabelSpace]:
    """Model, tokenizer, ``classification`` config section and label space of a finished classify run.

    Raises:
        TunelabError: the directory is not a finished ``task: classification`` run.
    """
    from transformers import AutoModelForSequenceClassification

    from tunelab.config.load import load_config
    from tunelab.models.run import load_run, read_run_info

    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    space = (info.get("results") or {}).get("label_space")
    if not (run_dir / "config.yaml").is_file() or space is None:
        raise TunelabError(f"{run_dir} is not a finished classification run (no config.yaml / label space in "
                           "tunelab.json); train one with task: classification")
    config = load_config(run_dir / "config.yaml")
    labels = LabelSpace(space["problem_type"], list(space["names"]))
    model, tokenizer, _ = load_run(run_dir, AutoModelForSequenceClassification,
                                   id2label=labels.id2label, label2id=labels.label2id,
                                   problem_type=HF_PROBLEM_TYPES[labels.problem_type])
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, config, labels


def prediction(problem_type: str, names: list[str], row: list[float], threshold: float) -> dict[str, Any]:
    """One example's answer from its probabilities ``row`` (K labels; regression: the K predicted values).

    Returns ``{"prediction": label, "probabilities": {label: p}}`` (single_label: the most probable label;
    multi_label: the labels with ``p >= threshold``), or ``{"prediction": value}`` for regression.
    """
    if problem_type == "regression":
        return {"prediction": row[0] if len(row) == 1 else row}
    probs = {name: round(p, 6) for name, p in zip(names, row)}
    if problem_type == "multi_label":
        return {"prediction": [n for n, p in zip(names, row) if p >= threshold], "probabilities": probs}
    return {"prediction": names[max(range(len(row)), key=row.__getitem__)], "probabilities": probs}
