"""The ``classification`` config section (``task: classification``): fields, labels, head.

Best-checkpoint selection and early stopping are ``train.metric_for_best`` / ``train.early_stopping_*``
(shared by every task); :data:`METRICS` lists the names classification reports for them.

Kept in its own module so the schema stays readable; :mod:`tunelab.config.schema` imports it.
Like every section it is strict: unknown keys are errors, and defaults live only here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tunelab.config.base import StrictModel

ProblemType = Literal["single_label", "multi_label", "regression"]

# Metrics each problem type reports (the names train.metric_for_best may use).
METRICS: dict[str, tuple[str, ...]] = {
    "single_label": ("loss", "accuracy", "macro_f1", "weighted_f1", "roc_auc"),
    "multi_label": ("loss", "subset_accuracy", "micro_f1", "macro_f1", "roc_auc"),
    "regression": ("loss", "mse", "mae", "r2"),
}
MOVED_TO_TRAIN = ("metric_for_best", "early_stopping_patience", "early_stopping_min_delta")
# Our problem types → transformers' ``config.problem_type``.
HF_PROBLEM_TYPES = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
                    "regression": "regression"}


class ClassificationConfig(StrictModel):
    """Sequence classification / regression settings (read by ``recipes/classify.py``)."""

    text_field: str = Field("text", description="Column holding the text to classify.")
    text_pair_field: str | None = Field(
        None, description="Optional second text column (premise/hypothesis style pairs); encoded as a pair."
    )
    label_field: str = Field(
        "label",
        description="Column holding the label: a name or int (single_label), a list of names/ids "
        "(multi_label), or a number / list of numbers (regression).",
    )
    problem_type: ProblemType = Field(
        "single_label",
        description="'single_label': softmax cross-entropy; 'multi_label': one sigmoid per label, BCE; "
        "'regression': MSE on one output per target.",
    )
    labels: list[str] | None = Field(
        None,
        description="Label names in id order. Default: every label seen in train, sorted (numerically "
        "if all are integers). With explicit names, an int label in the data is read as an id.",
    )
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="multi_label: sigmoid probability that counts as on.")
    class_weights: Literal["none", "balanced", "sqrt_balanced"] | list[float] = Field(
        "none",
        description="single_label: per-class loss weights ('balanced' = n / (K·n_k), as scikit-learn); "
        "multi_label: per-label positive weights ('balanced' = n_neg / n_pos). 'sqrt_balanced' = the square "
        "root of 'balanced' (halfway, on a log scale, between no weights and balanced). Not for regression.",
    )
    head_init: Literal["random", "linear_probe"] = Field(
        "random",
        description="How the new head starts. 'linear_probe' (LP-FT, Kumar et al. 2022): one no-grad pass "
        "over train, fit a scikit-learn linear model on the frozen features the head reads "
        "(regularization by CV, class_weights applied), copy it into the head, then fine-tune.",
    )
    pooling: Literal["model", "mean"] = Field(
        "model",
        description="What the head reads. 'model': the model's own read-out (encoders: the first-token/[CLS] "
        "head or pooler; decoders: the last real token). 'mean': the mean of the final hidden states over the real "
        "tokens (how sentence-transformers encoders such as all-mpnet-base-v2 were trained), fed to the same head.",
    )
    truncation_side: Literal["right", "left"] = Field(
        "right", description="Texts longer than data.max_seq_len keep their start ('right') or end ('left')."
    )
    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        moved = sorted(k for k in MOVED_TO_TRAIN if isinstance(data, dict) and k in data)
        if moved:
            raise ValueError(f"classification.{moved[0]} is now train.{moved[0]} (best-checkpoint selection and early "
                             "stopping are shared by every task); move it to the train section")
        return data

    @model_validator(mode="after")
    def _check(self) -> ClassificationConfig:
        if self.problem_type == "regression" and self.class_weights != "none":
            raise ValueError("class_weights apply to single_label and multi_label, not regression")
        if self.labels is not None:
            if len(set(self.labels)) != len(self.labels) or not self.labels:
                raise ValueError(f"labels must be a non-empty list of distinct names, got {self.labels}")
            if self.problem_type == "single_label" and len(self.labels) < 2:
                raise ValueError("single_label needs at least 2 labels")
        if isinstance(self.class_weights, list):
            if any(w < 0 for w in self.class_weights):
                raise ValueError("class_weights must be non-negative")
            if self.labels is not None and len(self.class_weights) != len(self.labels):
                raise ValueError(f"class_weights has {len(self.class_weights)} entries for {len(self.labels)} labels")
        return self

