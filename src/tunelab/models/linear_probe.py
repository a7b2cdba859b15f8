"""Initialize a new classification head by a linear probe on frozen features (LP-FT).

Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution" (ICLR; LP-FT, Sec. 4): fit the head as a linear model on the frozen
model's features first, then fine-tune everything (or the adapters) from there. A randomly
initialized head sends large, noisy gradients into the pretrained weights during the first steps;
a probed head starts near the best linear read-out, so fine-tuning refines features instead.

The features are exactly what the head's final ``nn.Linear`` sees — captured with a forward
pre-hook while :func:`tunelab.models.heads.sequence_logits` runs in eval mode — so the probe
is valid for any ``*ForSequenceClassification`` head: a decoder's ``score`` at the last real
token, BERT's ``classifier`` on the pooled output, RoBERTa's ``out_proj`` after its dense layer.
The linear model is scikit-learn's (multinomial logistic regression with the regularization picked
by cross-validation; one logistic regression per label for multi-label; ridge for regression),
fit on features scaled by their standard deviation, and the scaling is folded back into the
weights, so ``head(features)`` reproduces the fitted model's decision function.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from tunelab.errors import ConfigError
from tunelab.models.heads import sequence_logits

PROBE_CS = (0.001, 0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths tried by cross-validation
RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0)


def head_linear(model: nn.Module, head_modules: Iterable[str]) -> nn.Linear:
    """The last ``nn.Linear`` of the model's new head (the layer that produces the logits).

    Raises:
        ConfigError: the head contains no ``nn.Linear``.
    """
    for name in head_modules:
        module = model.get_submodule(name)
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        if linears:
            return linears[-1]
    raise ConfigError(f"classification.head_init=linear_probe: no nn.Linear in the head modules {list(head_modules)}")


@torch.no_grad()
def head_features(model: nn.Module, linear: nn.Linear, batches: Iterable[dict[str, Any]],
                  device: torch.device, pooling: str = "model") -> np.ndarray:
    """Inputs of ``linear`` over all ``batches`` (in order), with the model in eval mode and the
    read-out ``pooling`` (see :func:`tunelab.models.heads.sequence_logits`).

    Returns:
        features (N, hidden) float64, one row per sequence.
    """
    captured: list[torch.Tensor] = []
    hook = linear.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().float().cpu()))
    was_training = model.training
    model.train(False)
    try:
        for batch in batches:
            sequence_logits(model, {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()},
                            pooling)
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured).double().numpy()


def _unit_scale(features: np.ndarray) -> np.ndarray:
    """Per-feature standard deviation (1 where a feature is constant): the probe fits ``x / scale``
    and the weights are divided by it afterwards, so they apply to the raw features."""
    scale = features.std(axis=0)
    scale[scale < 1e-8] = 1.0
    return scale


def fit_linear_probe(features: np.ndarray, targets: np.ndarray, problem_type: str, *, num_labels: int,
                     class_weight: torch.Tensor | None, fit_intercept: bool,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Fit the linear read-out; returns weight (K, hidden), bias (K,) or None, and a summary.

    Args:
        features: (N, hidden) float features; targets: (N,) class ids or (N, K) floats.
        class_weight: (K,) per-class weights (single_label) or positive weights (multi_label).
        fit_intercept: whether the head has a bias (decoder ``score`` heads do not).

    Raises:
        ConfigError: fewer than 2 examples of some class for cross-validation (single_label).
    """
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    scale = _unit_scale(features)
    x = features / scale
    if problem_type == "single_label":
        present, counts = np.unique(targets, return_counts=True)
        if counts.min() < 2:
            raise ConfigError("classification.head_init=linear_probe needs >= 2 training examples of every class "
                              f"present; counts {dict(zip(present.tolist(), counts.tolist()))}")
        weights = None if class_weight is None else {int(c): float(class_weight[c]) for c in present}
        search = GridSearchCV(
            LogisticRegression(class_weight=weights, fit_intercept=fit_intercept, max_iter=3000),
            {"C": list(PROBE_CS)}, scoring="neg_log_loss",
            cv=StratifiedKFold(min(5, int(counts.min())), shuffle=True, random_state=seed),
        ).fit(x, targets)
        model = search.best_estimator_
        coef, intercept = _full_rows(model.coef_, model.intercept_, model.classes_, num_labels)
        summary = {"C": float(model.C), "train_accuracy": float((model.predict(x) == targets).mean())}
    elif problem_type == "multi_label":
        coef, intercept = np.zeros((num_labels, x.shape[1])), np.zeros(num_labels)
        for k in range(num_labels):
            column = targets[:, k].round().astype(int)
            if column.min() == column.max():  # all on or all off: a constant logit
                p = np.clip(column.mean(), 0.01, 0.99)
                intercept[k] = np.log(p / (1 - p))
                continue
            pos_weight = 1.0 if class_weight is None else float(class_weight[k])
            fitted = LogisticRegression(C=1.0, fit_intercept=fit_intercept, class_weight={0: 1.0, 1: pos_weight},
                                        max_iter=3000).fit(x, column)
            coef[k], intercept[k] = fitted.coef_[0], fitted.intercept_[0]
        summary = {"C": 1.0}
    else:
        model = RidgeCV(alphas=list(RIDGE_ALPHAS), fit_intercept=fit_intercept).fit(x, targets)
        coef, intercept = np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_)
        summary = {"alpha": float(model.alpha_), "train_r2": float(model.score(x, targets))}
    weight = coef / scale[None, :]
    return weight, (intercept if fit_intercept else None), summary


def _full_rows(coef: np.ndarray, intercept: np.ndarray, classes: np.ndarray,
               num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax logit rows for all K classes from scikit-learn's fit (binary fits have one row).

    A binary logistic model ``sigma(w.x + b)`` equals a softmax over ``[-(w.x + b)/2, (w.x + b)/2]``;
    classes absent from train get a zero row and a very low bias.
    """
    if coef.shape[0] == 1:
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    full_coef, full_bias = np.zeros((num_labels, coef.shape[1])), np.full(num_labels, -1e4)
    full_coef[classes], full_bias[classes] = coef, intercept
    return full_coef, full_bias


def init_head_by_probe(model: nn.Module, head_modules: Iterable[str], batches: Iterable[dict[str, Any]],
                       device: torch.device, problem_type: str, num_labels: int,
                       class_weight: torch.Tensor | None, seed: int = 0, pooling: str = "model") -> dict[str, Any]:
    """Set the head's final linear layer to the linear probe fitted on ``batches``; returns the summary.

    ``pooling`` is the read-out the classifier trains with (the features must be the ones it will see).

    Without a bias in the head, absent classes cannot get a low bias; their row stays zero.
    """
    linear = head_linear(model, head_modules)
    batches = list(batches)
    features = head_features(model, linear, batches, device, pooling)
    targets = torch.cat([b["labels"] for b in batches]).numpy()
    weight, bias, summary = fit_linear_probe(features, targets, problem_type, num_labels=num_labels,
                                             class_weight=class_weight, fit_intercept=linear.bias is not None,
                                             seed=seed)
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(weight, dtype=linear.weight.dtype))
        if bias is not None:
            linear.bias.copy_(torch.as_tensor(bias, dtype=linear.bias.dtype))
    return {**summary, "examples": int(features.shape[0]), "features": int(features.shape[1])}


def fit_pairwise_probe(chosen: np.ndarray, rejected: np.ndarray, chosen_seq: np.ndarray | None = None,
                       rejected_seq: np.ndarray | None = None, seed: int = 0,
                       folds: int = 5) -> tuple[np.ndarray, dict[str, Any]]:
    """Bradley–Terry linear probe: w maximizing sum log sigma(w·(f_chosen − f_rejected)), L2-regularized.

    This is logistic regression without intercept on the feature differences (each pair also
    entered flipped with label 0, so the fit is symmetric). A bias would cancel in every
    difference, so the head's bias is irrelevant to the ranking. The regularization C is picked by
    cross-validated held-out log-loss. When pairs share sequences (``chosen_seq``/``rejected_seq``
    give each pair's sequence ids), folds are drawn over *sequences*: a fold validates on the pairs
    whose two sequences both fall in it and trains on the pairs that touch no sequence in it, so a
    probe cannot score well by memorizing sequences it also saw in training.

    Args:
        chosen, rejected: (P, hidden) features of each pair's two sequences.
        chosen_seq, rejected_seq: (P,) int sequence ids, or None for independent pairs.

    Returns:
        weight (1, hidden) in the unscaled feature space and a summary (C, CV log-loss, train
        pairwise accuracy).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    diff = chosen - rejected
    scale = _unit_scale(np.concatenate([chosen, rejected]))
    x = np.concatenate([diff, -diff]) / scale  # each pair in both orientations: label 1, then label 0
    y = np.concatenate([np.ones(len(diff)), np.zeros(len(diff))])
    rng = np.random.default_rng(seed)
    if chosen_seq is None:
        pair_fold = rng.permutation(len(diff)) % folds
        masks = [(pair_fold != k, pair_fold == k) for k in range(folds)]
    else:
        seq_fold = rng.permutation(int(max(chosen_seq.max(), rejected_seq.max())) + 1) % folds
        fc, fr = seq_fold[chosen_seq], seq_fold[rejected_seq]
        masks = [((fc != k) & (fr != k), (fc == k) & (fr == k)) for k in range(folds)]

    def rows(mask: np.ndarray) -> np.ndarray:  # the pairs of ``mask``, in both orientations
        return np.flatnonzero(np.concatenate([mask, mask]))

    splits = [(rows(tr), rows(va)) for tr, va in masks if tr.sum() >= 2 and va.sum() >= 1]
    model = LogisticRegression(fit_intercept=False, max_iter=3000)
    if splits:
        search = GridSearchCV(model, {"C": list(PROBE_CS)}, scoring="neg_log_loss", cv=splits).fit(x, y)
        model, cv_log_loss = search.best_estimator_, round(float(-search.best_score_), 4)
    else:  # too few pairs to validate on: a fixed, moderate regularization
        model, cv_log_loss = model.set_params(C=1.0).fit(x, y), float("nan")
    weight = model.coef_ / scale[None, :]
    accuracy = float((diff @ weight[0] > 0).mean())
    return weight, {"C": float(model.C), "cv_log_loss": cv_log_loss, "train_pairwise_accuracy": accuracy}


def init_reward_head_by_probe(model: nn.Module, head_modules: Iterable[str],
                              pairs: list[tuple[list[int], list[int]]], pad_token_id: int, device: torch.device,
                              batch_size: int = 16, seed: int = 0) -> dict[str, Any]:
    """Set a 1-output reward head to the Bradley–Terry probe fitted on frozen features (LP-FT for RMs).

    Args:
        pairs: ``(chosen_ids, rejected_ids)`` per pair. Each distinct sequence is scored once,
            however many pairs share it (built-in pair sets reuse every review in many pairs).

    Returns:
        the probe summary (C, CV log-loss, train pairwise accuracy, pair and sequence counts).
    """
    from tunelab.data.collate import pad_collate

    index: dict[tuple[int, ...], int] = {}
    seq_ids = np.array([[index.setdefault(tuple(ids), len(index)) for ids in pair] for pair in pairs])
    sequences = [(list(ids), list(ids)) for ids in index]  # (input_ids, labels) for pad_collate; labels unused
    linear = head_linear(model, head_modules)
    batches = [pad_collate(sequences[i:i + batch_size], pad_token_id) for i in range(0, len(sequences), batch_size)]
    features = head_features(model, linear, batches, device)
    weight, summary = fit_pairwise_probe(features[seq_ids[:, 0]], features[seq_ids[:, 1]], seq_ids[:, 0],
                                         seq_ids[:, 1], seed=seed)
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(weight, dtype=linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.zero_()
    return {**summary, "pairs": len(pairs), "sequences": len(sequences)}
