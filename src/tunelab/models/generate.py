"""Batched generation from chat prompts (left padding, KV cache on)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunelab.data.encoding import prompt_ids
from tunelab.data.stop_tokens import stop_token_ids


def encode_prompts(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> dict[str, torch.Tensor]:
    """Render conversations with the generation prompt and left-pad them into one batch.

    Returns ``input_ids`` (B, T) int64 and ``attention_mask`` (B, T) int64 (1 = token), padded on
    the left so every prompt ends at the last column and generation continues from the same
    position. Ids come from :func:`tunelab.data.encoding.prompt_ids` (the training BOS policy).
    """
    rows = [prompt_ids(tokenizer, c) for c in conversations]  # the ids training sees for this prefix
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def generate_replies(
    model: nn.Module, tokenizer: Any, conversations: list[list[dict[str, str]]], *, max_new_tokens: int = 64,
    do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, streamer: Any = None,
) -> list[str]:
    """The assistant's next reply to each conversation (greedy by default), as text.

    Stops at EOS or the chat template's end-of-turn token(s) (:func:`tunelab.data.stop_tokens.stop_token_ids`,
    the ids training supervises at the end of each reply), or after ``max_new_tokens``.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in encode_prompts(tokenizer, conversations).items()}
    kwargs = {"do_sample": do_sample}
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    stop_ids = stop_token_ids(tokenizer)
    out = model.generate(
        **batch, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id, streamer=streamer, use_cache=True, **kwargs,
    )
    model.train(was_training)
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    return [tokenizer.decode(_until_stop(row, stop_ids), skip_special_tokens=True).strip() for row in new]


def _until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """The tokens before the first stop token (the stop token and the padding after it dropped)."""
    stops = [i for i, token in enumerate(ids) if token in stop_ids]
    return ids[:stops[0]] if stops else ids
