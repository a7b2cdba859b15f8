"""Held-out loss and perplexity of a causal LM."""

from __future__ import annotations

import math

import torch
from torch import nn

from tunelab.models.causal_lm import lm_loss
from tunelab.training.loop import Batch
from tunelab.training.precision import autocast


@torch.no_grad()
def evaluate_lm(
    model: nn.Module, batches: list[Batch], device: torch.device, *, precision: str = "auto", chunked: bool = True,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Mean next-token loss over every supervised token of ``batches`` and its perplexity.

    Returns:
        ``{"loss": nats per supervised token, "ppl": exp(loss), "tokens": supervised tokens}``.
    """
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    for batch in batches:
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with autocast(precision, device):
            _, metrics = lm_loss(model, tensors, 1, chunked=chunked, chunk_size=chunk_size)
        nll += float(metrics["nll_sum"])
        tokens += int(metrics["num_tokens"])
    model.train(was_training)
    loss = nll / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": tokens}
