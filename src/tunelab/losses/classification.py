"""Sequence classification and regression losses: pure tensor functions.

Shapes: B sequences, K head outputs (classes, labels or regression targets). Every loss is a
*sum over the micro-batch divided by ``normalizer``*, the number of examples in the whole
accumulated batch, so accumulating micro-batches equals one big batch (see ``training/loop.py``).
Each returns ``(loss, metrics)``; metrics are likewise sums divided by ``normalizer`` so they
add up across micro-batches to the accumulated batch's mean. Units: nats (CE/BCE), squared
target units (MSE).

Class weights follow scikit-learn's ``class_weight`` (sample weights scale each example's
loss; the sum is *not* renormalized by the total weight, unlike ``torch``'s weighted
``reduction='mean'``), so "balanced" weights keep the loss on the unweighted scale on average.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def single_label_loss(
    logits: torch.Tensor, labels: torch.Tensor, normalizer: int, class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Softmax cross-entropy ``Σ_i w[y_i] · (−log softmax(z_i)[y_i]) / normalizer``.

    Args:
        logits: (B, K) float, unnormalized class scores.
        labels: (B,) int64 class ids in [0, K).
        normalizer: examples in the accumulated batch (≥ 1).
        class_weights: (K,) float per-class weights ``w``, or None for all ones.

    Returns:
        loss (scalar, nats) and ``{"accuracy": correct / normalizer}``.
    """
    nll = F.cross_entropy(logits.float(), labels, reduction="none")
    if class_weights is not None:
        nll = nll * class_weights.to(nll.device, nll.dtype)[labels]
    correct = (logits.argmax(dim=-1) == labels).sum().float()
    return nll.sum() / normalizer, {"accuracy": correct.detach() / normalizer}


def multi_label_loss(
    logits: torch.Tensor, targets: torch.Tensor, normalizer: int, pos_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-label sigmoid binary cross-entropy, averaged over labels, summed over examples.

    ``loss = Σ_i (1/K) Σ_k −[p_k · t_ik · log σ(z_ik) + (1 − t_ik) · log(1 − σ(z_ik))] / normalizer``
    with ``p_k = pos_weight[k]`` (1 if None), the weight of positive targets of label k.

    Args:
        logits: (B, K) float.
        targets: (B, K) float in {0, 1} (soft targets in [0, 1] also work).
        normalizer: examples in the accumulated batch.
        pos_weight: (K,) float or None.

    Returns:
        loss (scalar, nats) and ``{"label_accuracy": mean over labels of (σ(z) > 0.5) == t, / normalizer}``.
    """
    weight = None if pos_weight is None else pos_weight.to(logits.device, torch.float32)
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=weight, reduction="none")
    hits = ((logits > 0).float() == targets).float().mean(dim=-1).sum()
    return bce.mean(dim=-1).sum() / normalizer, {"label_accuracy": hits.detach() / normalizer}


def regression_loss(
    predictions: torch.Tensor, targets: torch.Tensor, normalizer: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean squared error per example (mean over K targets), summed over examples / normalizer.

    Args:
        predictions: (B, K) float head outputs.
        targets: (B, K) float.
        normalizer: examples in the accumulated batch.

    Returns:
        loss (scalar, squared target units) and ``{"mae": Σ_i mean_k |pred − target| / normalizer}``.
    """
    diff = predictions.float() - targets.float()
    mae = diff.abs().mean(dim=-1).sum()
    return diff.pow(2).mean(dim=-1).sum() / normalizer, {"mae": mae.detach() / normalizer}


def classification_loss(
    problem_type: str, logits: torch.Tensor, labels: torch.Tensor, normalizer: int,
    class_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dispatch on ``problem_type`` (single_label | multi_label | regression); see the functions above.

    Raises:
        ValueError: unknown problem type, or class weights given for regression.
    """
    if problem_type == "single_label":
        return single_label_loss(logits, labels, normalizer, class_weights)
    if problem_type == "multi_label":
        return multi_label_loss(logits, labels, normalizer, class_weights)
    if problem_type == "regression":
        if class_weights is not None:
            raise ValueError("class weights do not apply to regression")
        return regression_loss(logits, labels, normalizer)
    raise ValueError(f"unknown problem_type {problem_type!r}")
