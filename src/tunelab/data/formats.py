"""Record formats → one canonical example.

Canonical examples are plain dicts of one of three kinds:
  * ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
  * ``{"prompt": str, "completion": str}`` (rendered through the chat template when the
    tokenizer has one, else concatenated as plain text)
  * ``{"text": str}`` (raw text for continued pre-training: every token supervised)

Formats (``data.format``):
  * ``messages``: ``messages`` = list of ``{role, content}``.
  * ``sharegpt``: ``conversations`` = list of ``{from, value}``; from ∈ human/user, gpt/assistant/…, system.
  * ``alpaca``: ``instruction``, optional ``input``, ``output`` (optional ``system``).
  * ``prompt_completion``: ``prompt``, ``completion``.
  * ``text``: ``text``.
``data.columns`` maps these canonical field names to the columns a dataset really uses.
"""

from __future__ import annotations

import difflib

from typing import Any

from tunelab.data.sources import present_fields
from tunelab.errors import DataError

REQUIRED_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
}
ROLES = ("system", "user", "assistant")


def detect_format(record: dict[str, Any], columns: dict[str, str], where: str = "") -> str:
    """Guess the format from the fields of one record (``where`` names it in errors: file and record).

    Raises:
        DataError: no known format's fields are present (the message names ``where`` and suggests the
            closest known field for a misspelled one).
    """
    fields = set(present_fields(record))
    has = {name: columns.get(name, name) in fields for name in ("messages", "conversations", "instruction",
                                                                 "output", "prompt", "completion", "text")}
    if has["messages"]:
        return "messages"
    if has["conversations"]:
        turns = record[columns.get("conversations", "conversations")]
        if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "role" in turns[0]:
            return "messages"
        return "sharegpt"
    if has["instruction"] and has["output"]:
        return "alpaca"
    if has["prompt"] and has["completion"]:
        return "prompt_completion"
    if has["text"]:
        return "text"
    known = [columns.get(name, name) for name in has]
    close = {f: difflib.get_close_matches(f, known, n=1) for f in sorted(fields)}
    hint = "".join(f" ({f!r}: did you mean {m[0]!r}?)" for f, m in close.items() if m)
    raise DataError(
        f"{where + ': ' if where else ''}cannot detect the data format from fields {sorted(fields)}{hint}; "
        f"set data.format to one of {sorted(REQUIRED_FIELDS)} and map your columns with data.columns"
    )


def to_example(record: dict[str, Any], fmt: str, columns: dict[str, str], where: str) -> dict[str, Any]:
    """Convert one raw record to a canonical example.

    Args:
        where: how to name the record in errors, e.g. ``"data.jsonl record #12"``.

    Raises:
        DataError: a field the format needs is missing or has the wrong type.
    """
    def field(name: str, required: bool = True) -> Any:
        column = columns.get(name, name)
        value = record.get(column)
        if value is None and required:
            expected = [columns.get(f, f) for f in REQUIRED_FIELDS[fmt]]
            raise DataError(
                f"{where}: format '{fmt}' needs fields {expected}; missing '{column}' "
                f"(record has {present_fields(record)})"
            )
        return value

    if fmt == "messages":
        key = "messages" if record.get(columns.get("messages", "messages")) is not None else "conversations"
        return {"messages": _messages(field(key), where, role_key="role", content_key="content")}
    if fmt == "sharegpt":
        return {"messages": _messages(field("conversations"), where, role_key="from", content_key="value")}
    if fmt == "alpaca":
        instruction, extra = _text(field("instruction"), where), field("input", required=False)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(field("output"), where)}]
        system = field("system", required=False)
        return {"messages": ([{"role": "system", "content": system}] if system else []) + messages}
    if fmt == "prompt_completion":
        return {"prompt": _text(field("prompt"), where), "completion": _text(field("completion"), where)}
    if fmt == "text":  # a string ``source`` (a text-file source's file name) names the document in data inspect
        source = record.get("source")
        return {"text": _text(field("text"), where), **({"source": source} if isinstance(source, str) else {})}
    raise DataError(f"unknown data format '{fmt}'")


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: expected a string, got {type(value).__name__}: {str(value)[:60]!r}")
    return value


def _messages(turns: Any, where: str, role_key: str, content_key: str) -> list[dict[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: expected a non-empty list of turns, got {str(turns)[:80]!r}")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise DataError(f"{where}: turn {i} needs fields '{role_key}' and '{content_key}', got {str(turn)[:80]!r}")
        raw_role = str(turn[role_key]).lower()
        role = SHAREGPT_ROLES.get(raw_role) if role_key == "from" else raw_role
        if role not in ROLES:
            raise DataError(f"{where}: turn {i} has role '{turn[role_key]}'; allowed: {sorted(SHAREGPT_ROLES if role_key == 'from' else ROLES)}")
        out.append({"role": role, "content": _text(turn[content_key], where)})
    return out
