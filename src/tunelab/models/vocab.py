"""Tokens added for fine-tuning (``model.add_special_tokens``, e.g. tool-call markers).

The tokenizer gains them as special tokens (never split, never merged with text); the model's
input embeddings (and an untied output head) grow by as many rows, each new row initialised to
the mean of the existing rows (Hewitt 2021, "Initializing new word embeddings for pretrained
language models": the mean keeps the new tokens' initial logits, and so the model's output
distribution, close to the old one). With LoRA those modules are trained in full and saved as
PEFT ``modules_to_save``; :func:`tunelab.models.run.load_run` resizes the base from the run's
tokenizer again before loading them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def add_special_tokens(tokenizer: Any, tokens: list[str]) -> list[str]:
    """Add ``tokens`` as special tokens the vocabulary does not have yet; returns those added."""
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    return new


def resize_for_tokenizer(model: nn.Module, tokenizer: Any, added: list[str]) -> list[str]:
    """Give the ``added`` tokens embedding rows initialised to the mean of the rows before them.

    The matrices grow to ``len(tokenizer)`` rows when they are smaller (a base whose vocabulary is
    padded with spare rows keeps its size); the input embeddings and an untied output head are both
    initialised.

    Returns:
        The module names that hold vocabulary rows (input embeddings and output head), to be trained
        in full and saved with an adapter; empty when nothing was added.
    """
    if not added:
        return []
    ids = tokenizer.convert_tokens_to_ids(added)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    first = min(ids)
    with torch.no_grad():
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.weight[ids] = module.weight[:first].mean(dim=0, keepdim=True)
    return vocabulary_modules(model)


def vocabulary_modules(model: nn.Module) -> list[str]:
    """Names of the input-embedding and output-head modules (both, also when their weight is tied)."""
    wanted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return [name for name, module in model.named_modules() if any(module is m for m in wanted)]
