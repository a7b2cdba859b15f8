"""Turn tokenized examples into model-ready tensors, padded or packed.

Batch keys (``int64`` tensors, B rows × T tokens):
  * ``input_ids`` (B, T)
  * ``labels`` (B, T): ``-100`` where a token does not count (padding, prompt, example starts)
  * ``attention_mask`` (B, T) bool, True on real tokens — padded batches only
  * ``position_ids`` (B, T) — packed batches only: restart at 0 for every example, which makes
    transformers build a block-diagonal causal mask (sdpa/eager/flex) or use varlen flash
    attention; ``attention_mask`` must then be absent and the KV cache off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

IGNORE_INDEX = -100


def pad_collate(examples: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``(input_ids, labels)`` pairs to the longest in the batch."""
    longest = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.bool)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = True
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def packed_collate(
    rows: Sequence[Sequence[tuple[list[int], list[int]]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples; ``position_ids`` restart at 0 at every example start.

    The first label of every example is set to ``-100`` so no token is trained to predict the
    start of the next, unrelated example. Rows shorter than the longest are filled with pad
    tokens forming one more segment (its own position_ids from 0, labels ``-100``), which real
    tokens never attend to.
    """
    longest = max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for ids, labs in row:
            end = start + len(ids)
            input_ids[r, start:end] = torch.tensor(ids)
            labels[r, start:end] = torch.tensor(labs)
            labels[r, start] = IGNORE_INDEX
            position_ids[r, start:end] = torch.arange(len(ids))
            start = end
        position_ids[r, start:] = torch.arange(longest - start)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def num_supervised_tokens(labels: torch.Tensor) -> int:
    """Tokens that count in the shifted causal-LM loss: ``labels[:, 1:] != -100``."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
