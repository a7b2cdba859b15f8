"""Text → token ids with one special-token (BOS) policy, for training and every serving path.

The policy, applied here and nowhere else:
  * text written by a chat template: the template decides. Nothing is added; a BOS the template
    writes is kept once (the tokenizer's own BOS is never added on top: the double-BOS bug). This
    is what ``apply_chat_template(tokenize=True)``, transformers pipelines and vLLM feed a model.
  * plain text (raw text, prompt/completion without a template): the tokenizer's own leading
    special tokens (BOS, CLS) are added, unless the text already starts with them.

Training (:mod:`tunelab.data.tokenize`, :mod:`tunelab.data.preference`) and serving (chat, sample
answers and ``generate-rejected`` through :mod:`tunelab.models.generate`, RL prompts through
:mod:`tunelab.rollout.prompts`) all call :func:`encode_text` / :func:`prompt_ids`, so the ids a model
is served for a conversation prefix are the ids it was trained on.
"""

from __future__ import annotations

from typing import Any

from tunelab.data.templates import apply_template


def special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer itself puts before and after a text (e.g. ``[BOS]``, ``[]``; ``[CLS]``, ``[SEP]``)."""
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    start = next((i for i in range(len(with_special)) if with_special[i:i + len(plain)] == plain), 0)
    return list(with_special[:start]), list(with_special[start + len(plain):])


def encode_text(tokenizer: Any, text: str, templated: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` and each token's character span ``(start, end)`` in it.

    Args:
        templated: the text was rendered by a chat template (see the module docstring).

    Returns:
        ``ids`` and ``offsets`` (same length); an added special token has offsets ``(0, 0)``.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if templated:
        return ids, offsets
    prefix, _ = special_tokens_around(tokenizer)
    if prefix and ids[: len(prefix)] != prefix:
        ids, offsets = prefix + ids, [(0, 0)] * len(prefix) + offsets
    return ids, offsets


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The ids a chat model is fed to write the next reply to ``messages`` (generation prompt on)."""
    return encode_text(tokenizer, apply_template(tokenizer, messages, add_generation_prompt=True), templated=True)[0]
