"""Which token ids end a generated reply: EOS plus the chat template's end-of-turn token(s).

Read from the template itself, not from a list of known names: a conversation whose reply is a
sentinel string is rendered, and the text the template puts right after the reply (before the
next turn could start) is tokenized. Its special/added tokens are the end-of-turn tokens
(``<|im_end|>`` for ChatML, ``<end_of_turn>`` for Gemma, ``<|eot_id|>`` for Llama 3, ``<|end|>``
for Phi-3, ``</s>`` for Mistral/Llama 2, any marker of a template of your own). A textual marker
that is one vocabulary token (a word-level toy vocabulary) counts too. A marker that spans several
ordinary tokens cannot be a stop id; then only EOS stops (the reply is still supervised on it).

These ids are what training supervises at the end of each reply (the span of
:mod:`tunelab.data.templates` ends with them), so every generation path and every saved
``generation_config.json`` stops where the model learned to stop.
"""

from __future__ import annotations

from typing import Any

SENTINEL = "TUNELABREPLYSENTINEL"


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids the chat template writes right after an assistant reply (empty without a template).

    Returns:
        Sorted distinct ids; empty when the tokenizer has no chat template, the template writes
        nothing after a reply, or what it writes is several ordinary (non-special) tokens.
    """
    if not getattr(tokenizer, "chat_template", None):
        return []
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses this conversation shape (jinja raise_exception)
        return []
    after = text.split(SENTINEL, 1)[1] if SENTINEL in text else ""
    marker = after.strip()
    if not marker:
        return []
    ids = tokenizer(marker, add_special_tokens=False).input_ids
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
        return []  # the marker is not in the vocabulary: the model cannot emit it
    special = _special_ids(tokenizer)
    found = [i for i in ids if i in special]
    if found:
        return sorted(set(found))
    return list(ids) if len(ids) == 1 else []


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS plus the template's end-of-turn ids (:func:`end_of_turn_ids`): where a reply stops.

    Args:
        tokenizer: a transformers tokenizer (its chat template, if any, is read).

    Returns:
        Sorted distinct token ids; never empty when the tokenizer has an EOS token.
    """
    ids = set(end_of_turn_ids(tokenizer))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    ids.update(int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {}))
    return ids
