"""Sequence-level heads (classification, reward/value scores) read at the right token.

Decoder LLMs (``*ForSequenceClassification`` with a ``score`` head) read the head at the last
real token of each row, found from ``attention_mask`` — so left, right or no padding give the
same score — with ``position_ids`` counted from the first real token. Encoders (BERT-like) use
their own pooled output on the batch moved to right padding (:func:`right_align`), so left
padding gives the same outputs too.

``pooling="mean"`` replaces that read-out with the mean of the final hidden states over the real
tokens (how sentence-transformers encoders such as all-MiniLM-L6-v2 and all-mpnet-base-v2 were
trained; Reimers & Gurevych 2019, arXiv:1908.10084, Sec. 3), fed to the same head: BERT-style heads
(``dropout`` → ``classifier`` Linear, DistilBERT's ``pre_classifier`` first) skip the [CLS] pooler;
RoBERTa/MPNet-style heads (``classifier.dense`` → ``classifier.out_proj``, which read position 0)
get the mean as a one-position sequence; decoders' ``score`` reads the mean instead of the last token.
"""

from __future__ import annotations

import torch
from torch import nn

from tunelab.errors import ConfigError


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


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (B, T, H) over the positions where ``attention_mask`` (B, T) is 1/True: (B, H).

    A row without any real token gives zeros (its denominator is clamped to 1)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def sequence_logits(model: nn.Module, batch: dict[str, torch.Tensor], pooling: str = "model") -> torch.Tensor:
    """Head outputs per sequence, (B, num_labels) float.

    Args:
        model: a transformers ``AutoModelForSequenceClassification`` model.
        batch: ``input_ids`` (B, T) and ``attention_mask`` (B, T) (True/1 on real tokens);
            ``token_type_ids`` are passed to encoders that take them.
        pooling: ``model`` (the model's own read-out: encoders' [CLS]/first-token head, decoders'
            last real token) or ``mean`` (mean of the final hidden states over real tokens; see the
            module docstring).

    Raises:
        ConfigError: ``pooling="mean"`` with an encoder head of a shape this function does not know.
    """
    if pooling == "mean":
        return _mean_pooled_logits(model, batch)
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


def _mean_pooled_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The head applied to the masked mean of the final hidden states, (B, num_labels)."""
    if is_decoder_classifier(model):
        mask = batch["attention_mask"]
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=mask,
                                     position_ids=position_ids_from_mask(mask), use_cache=False).last_hidden_state
        return model.score(masked_mean(hidden, mask))
    batch = right_align(batch)
    extra = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
    encoder = getattr(model, model.base_model_prefix)
    hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).last_hidden_state
    pooled = masked_mean(hidden, batch["attention_mask"])
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Linear):  # BERT / DistilBERT: [dropout →] (pre_classifier → ReLU →) dropout → classifier
        pre = getattr(model, "pre_classifier", None)
        if isinstance(pre, nn.Linear):
            pooled = torch.relu(pre(pooled))
        dropout = getattr(model, "dropout", None)
        return head(dropout(pooled) if isinstance(dropout, nn.Module) else pooled)
    if isinstance(getattr(head, "out_proj", None), nn.Linear):  # RoBERTa / MPNet heads read features[:, 0]
        return head(pooled.unsqueeze(1))
    raise ConfigError(f"classification.pooling=mean: unsupported head {type(head).__name__} on "
                      f"{type(model).__name__} (supported: a Linear 'classifier', a 'classifier' with 'out_proj', "
                      "or a decoder 'score'); use pooling: model")
