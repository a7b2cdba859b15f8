"""Which held-out metrics can pick the best checkpoint (``train.metric_for_best``), per task.

The names are the keys each recipe's evaluation reports (``eval/<name>`` in ``metrics.jsonl``);
kept here, beside the schema, so a misspelt metric is a config error before any model loads.
"""

from __future__ import annotations

from tunelab.config.classification import METRICS as CLASSIFICATION_METRICS

SELECTION_METRICS: dict[str, tuple[str, ...]] = {
    "sft": ("loss", "ppl", "token_accuracy"),
    "dpo": ("loss", "policy/accuracy", "policy/margin", "policy/accuracy_per_token", "policy/margin_per_token",
            "rewards/accuracy", "rewards/margins"),
    "reward": ("loss", "accuracy", "margin"),
}
# preference.loss=kto (task dpo) reports its own loss and, for held-out records that were pairs, the DPO
# pair metrics under a ``pairs/`` prefix.
KTO_METRICS = ("loss", "pairs/policy/accuracy", "pairs/policy/margin", "pairs/rewards/accuracy",
               "pairs/rewards/margins")
LOWER_IS_BETTER = frozenset({"loss", "ppl", "mse", "mae"})


def higher_is_better(metric: str) -> bool:
    """True when a larger value of ``metric`` is better (accuracy, F1, AUC, r2, margins)."""
    return metric not in LOWER_IS_BETTER


def selection_metrics(task: str, problem_type: str | None = None, loss: str | None = None) -> tuple[str, ...]:
    """The metrics ``train.metric_for_best`` may name for ``task`` (with classification's ``problem_type``,
    the preference ``loss``); empty: the task has no selection."""
    if task == "dpo" and loss == "kto":
        return KTO_METRICS
    if task == "classification":
        return CLASSIFICATION_METRICS[problem_type or "single_label"]
    return SELECTION_METRICS.get(task, ())


def check_metric_for_best(task: str, metric: str | None, problem_type: str | None = None,
                          loss: str | None = None) -> None:
    """Raise ValueError (pydantic reports the key) when ``metric`` is not reported by ``task``."""
    if metric is None:
        return
    allowed = selection_metrics(task, problem_type, loss)
    if not allowed:
        raise ValueError(f"train.metric_for_best applies to task sft, dpo, reward and classification, not "
                         f"task={task} (it has no held-out evaluation between steps)")
    if metric not in allowed:
        kind = f"task={task}" + (f" (problem_type {problem_type})" if task == "classification" else "") + \
            (" (preference.loss kto)" if task == "dpo" and loss == "kto" else "")
        raise ValueError(f"train.metric_for_best '{metric}' is not reported by {kind}; choose one of {list(allowed)}")
