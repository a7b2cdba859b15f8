"""Causal-LM forward passes that feed tunelab's losses (hidden states, not full logits)."""

from __future__ import annotations

import torch
from torch import nn

from tunelab.losses.causal_lm import causal_lm_loss, causal_lm_loss_from_logits


def supports_hidden_state_loss(model: nn.Module) -> bool:
    """True when logits are exactly ``hidden @ lm_head.T (+ bias)`` (no soft-capping or scaling)."""
    config = model.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False
    return isinstance(model.get_output_embeddings(), nn.Linear)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys a transformers model takes; packed batches carry position_ids and no attention_mask."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def lm_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], normalizer: int, *, chunked: bool = True, chunk_size: int = 1024,
    label_smoothing: float = 0.0, with_predictions: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token loss of a causal LM on a padded or packed batch, divided by ``normalizer``.

    With ``chunked`` (and a plain linear head) the decoder's final hidden states go to
    :func:`tunelab.losses.causal_lm.causal_lm_loss`, so the (tokens × vocab) logits are never
    materialized; otherwise the model's own logits are used (same value, more memory).
    ``label_smoothing`` and ``with_predictions`` are passed on (see ``causal_lm_loss``).
    """
    extra = {"label_smoothing": label_smoothing, "with_predictions": with_predictions}
    inputs = model_inputs(batch)
    if chunked and supports_hidden_state_loss(model):
        hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        return causal_lm_loss(hidden, head.weight, batch["labels"], normalizer, bias=head.bias, chunk_size=chunk_size,
                              **extra)
    logits = model(**inputs, use_cache=False).logits
    return causal_lm_loss_from_logits(logits, batch["labels"], normalizer, **extra)
