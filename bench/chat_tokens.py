"""Chat-template tokenization with assistant-only labels (shared by the peer side).

Assistant spans are found by rendering prefixes: for assistant message ``i`` the span is
``ids(messages[:i+1])[len(ids(messages[:i], add_generation_prompt=True)):]``, with trailing
whitespace-only tokens after the end-of-turn token (``<|im_end|>`` then ``"\\n"`` for SmolLM2)
removed. So the reply text and its ``<|im_end|>`` are supervised; the system prompt, user turns,
``<|im_start|>assistant\\n`` headers and the newline after ``<|im_end|>`` are not (label -100).
Prefix renderings must be token-prefixes of the full rendering; this is checked, not assumed.
"""
from __future__ import annotations

import json
import pathlib

from bench.sharegpt_data import chat_token_ids

IGNORE_INDEX = -100


def _trim_trailing_whitespace(tokenizer, ids: list[int], start: int, end: int) -> int:
    """Move ``end`` left over tokens that decode to pure whitespace (never below ``start``)."""
    while end > start and tokenizer.decode([ids[end - 1]]).strip() == "":
        end -= 1
    return end


def encode_conversation(tokenizer, messages: list[dict]) -> dict:
    """Return ``{"input_ids", "labels"}`` (lists of int) for one conversation; labels -100 outside replies."""
    ids = chat_token_ids(tokenizer, messages)
    labels = [IGNORE_INDEX] * len(ids)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        head = chat_token_ids(tokenizer, messages[:i], add_generation_prompt=True)
        upto = chat_token_ids(tokenizer, messages[: i + 1])
        if ids[: len(head)] != head or ids[: len(upto)] != upto:
            raise ValueError(f"chat-template prefix of turn {i} is not a token prefix of the full rendering")
        start, end = len(head), _trim_trailing_whitespace(tokenizer, ids, len(head), len(upto))
        labels[start:end] = ids[start:end]
    return {"input_ids": ids, "labels": labels}


def load_jsonl_messages(path) -> list[list[dict]]:
    """Read ``{"messages": [...]}`` JSONL lines (as written by bench.sharegpt_data)."""
    with open(pathlib.Path(path), encoding="utf-8") as fh:
        return [json.loads(line)["messages"] for line in fh if line.strip()]


def encode_file(tokenizer, path, max_len: int) -> tuple[list[dict], int]:
    """Encode every conversation in ``path``; drop those longer than ``max_len`` tokens.

    Returns (examples, n_dropped). Each example also carries ``idx`` (its line number).
    """
    examples, dropped = [], 0
    for idx, messages in enumerate(load_jsonl_messages(path)):
        ex = encode_conversation(tokenizer, messages)
        if len(ex["input_ids"]) > max_len:
            dropped += 1
            continue
        ex["idx"] = idx
        examples.append(ex)
    return examples, dropped
