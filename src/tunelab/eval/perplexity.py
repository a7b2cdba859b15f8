"""Held-out loss, perplexity and token accuracy of a causal LM, plus a hook for recipe metrics.

Every metric is reduced batch by batch to integer predictions or counts: the chunked loss never
forms the full ``[tokens, vocab]`` logits, and a :class:`TokenMetric` receives only the (N,) argmax
predictions and targets of one batch's supervised positions, so nothing vocabulary-sized is kept
across batches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from tunelab.models.causal_lm import lm_loss
from tunelab.training.loop import Batch
from tunelab.training.precision import autocast


class TokenMetric(Protocol):
    """A held-out metric accumulated from integer predictions, one batch at a time (the recipe hook)."""

    def update(self, predictions: torch.Tensor, targets: torch.Tensor, batch: Batch) -> None:
        """Fold one batch in. ``predictions``, ``targets``: (N,) int64 argmax and true next-token ids at
        the batch's N supervised positions (row-major order); ``batch`` is the batch as evaluated."""

    def compute(self) -> dict[str, float]:
        """The metric's values over every batch seen so far."""


@torch.no_grad()
def evaluate_lm(
    model: nn.Module, batches: list[Batch], device: torch.device, *, precision: str = "auto", chunked: bool = True,
    chunk_size: int = 1024, metrics: Sequence[TokenMetric] = (),
) -> dict[str, float]:
    """Mean next-token loss over every supervised token of ``batches``, its perplexity and token accuracy.

    Args:
        metrics: extra :class:`TokenMetric` hooks; their ``compute()`` values join the result.

    Returns:
        ``{"loss": nats per supervised token, "ppl": exp(loss), "token_accuracy": fraction of supervised
        tokens whose argmax prediction is the target, "tokens": supervised tokens, **hook values}``.
    """
    was_training = model.training
    model.eval()
    nll, tokens, correct = 0.0, 0, 0
    for batch in batches:
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with autocast(precision, device):
            _, out = lm_loss(model, tensors, 1, chunked=chunked, chunk_size=chunk_size, with_predictions=bool(metrics))
        nll += float(out["nll_sum"])
        tokens += int(out["num_tokens"])
        correct += int(out["num_correct"])
        for metric in metrics:
            metric.update(out["predictions"], out["targets"], tensors)
    model.train(was_training)
    loss = nll / max(tokens, 1)
    result = {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "token_accuracy": correct / max(tokens, 1),
              "tokens": tokens}
    for metric in metrics:
        result.update(metric.compute())
    return result
