"""Sequence-level heads (classification, reward/value scores) read at the right token.

Decoder LLMs (``*ForSequenceClassification`` with a ``score`` head) read the head at the last
real token of each row, found from ``attention_mask`` — so left, right or no padding give the
same score — with ``position_ids`` counted from the first real token. Encoders (BERT-like) use
their own pooled output on the batch moved to right padding (:func:`right_align`), so left
padding gives the same outputs too.
"""

from __future__ import annotations

import torch
from torch import nn


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True per row of a (B, T) mask, for any padding side; (B,) int64."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting real tokens from 0, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def right_align(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move each row's real tokens to the front (right padding), keeping their order.

    Encoders with absolute positions and a first-token ([CLS]) pooler are only invariant to
    *right* padding; this makes left-padded batches give the same outputs. ``input_ids``,
    ``attention_mask`` and ``token_type_ids`` (B, T) are permuted per row; other keys pass through.
    """
    order = torch.argsort((batch["attention_mask"] == 0).to(torch.int8), dim=1, stable=True)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {k: v.gather(1, order) if k in keys else v for k, v in batch.items()}


def is_decoder_classifier(model: nn.Module) -> bool:
    """True for decoder ``*ForSequenceClassification`` models (a linear ``score`` head)."""
    return isinstance(getattr(model, "score", None), nn.Linear)


def sequence_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Head outputs per sequence, (B, num_labels) float.

    Args:
        model: a transformers ``AutoModelForSequenceClassification`` model.
        batch: ``input_ids`` (B, T) and ``attention_mask`` (B, T) (True/1 on real tokens);
            ``token_type_ids`` are passed to encoders that take them.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    if not is_decoder_classifier(model):
        batch = right_align(batch)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        return model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return model.score(hidden[rows, last_token_index(attention_mask)])
