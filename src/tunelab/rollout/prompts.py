"""Prompts for RL: records → chat prompts → token ids, dropping (and counting) over-long prompts.

A record gives its prompt as ``prompt`` (a string: one user message) or ``messages`` /
``conversations`` (a list of ``{role, content}`` turns; a trailing assistant turn is removed, so SFT
data works as prompts too). ``data.columns`` renames these fields. Every other field of the
record (e.g. ``answer``) is kept and handed to the reward functions as ``example``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.config.schema import DataConfig, DataSource
from tunelab.data.encoding import prompt_ids
from tunelab.data.sources import load_records, present_fields
from tunelab.errors import DataError


@dataclass
class Prompt:
    """One RL prompt: chat ``messages`` (ending with a user turn), its token ids, the source record."""

    messages: list[dict[str, str]]
    input_ids: list[int]
    example: dict[str, Any]

    @property
    def text(self) -> str:
        """The last user message (what reward functions get as ``prompt``)."""
        return self.messages[-1]["content"]


@dataclass
class PromptSet:
    """Prompts kept, and how many records were dropped for exceeding ``max_prompt_len``."""

    prompts: list[Prompt]
    num_records: int
    num_too_long: int = 0
    num_duplicates: int = 0
    longest_dropped: int = 0
    kept_lengths: list[int] = field(default_factory=list)


def record_messages(record: dict[str, Any], columns: dict[str, str], where: str) -> list[dict[str, str]]:
    """Chat messages of a prompt record, ending with a user turn.

    Raises:
        DataError: no prompt field, a malformed turn, or no user turn left.
    """
    prompt_key = columns.get("prompt", "prompt")
    if isinstance(record.get(prompt_key), str):
        return [{"role": "user", "content": record[prompt_key]}]
    for key in ("messages", "conversations"):
        turns = record.get(columns.get(key, key))
        if isinstance(turns, list) and turns:
            messages = [_turn(t, where, i) for i, t in enumerate(turns)]
            while messages and messages[-1]["role"] == "assistant":
                messages.pop()
            if messages and messages[-1]["role"] == "user":
                return messages
            raise DataError(f"{where}: the conversation must contain a user turn to answer")
    raise DataError(f"{where}: an RL prompt record needs a '{prompt_key}' string or a 'messages' list "
                    f"(record has {present_fields(record)}); map your column with data.columns")


def _turn(turn: Any, where: str, i: int) -> dict[str, str]:
    if isinstance(turn, dict) and "role" in turn and "content" in turn:
        return {"role": str(turn["role"]), "content": str(turn["content"])}
    if isinstance(turn, dict) and "from" in turn and "value" in turn:
        role = {"human": "user", "gpt": "assistant"}.get(turn["from"], str(turn["from"]))
        return {"role": role, "content": str(turn["value"])}
    raise DataError(f"{where}: turn {i} needs role/content (or from/value), got {str(turn)[:80]!r}")


def load_prompts(
    source: DataSource, data: DataConfig, tokenizer: Any, max_prompt_len: int, limit: int | None = None,
) -> PromptSet:
    """Read ``source`` as RL prompts rendered with the chat template's generation prompt.

    Prompts longer than ``max_prompt_len`` tokens are dropped and counted, never truncated (a cut
    prompt would ask a different question). A prompt identical to an earlier one is kept once
    (counted in ``num_duplicates``; the first record's fields are the ones rewards see).

    Raises:
        DataError: a bad record (see :func:`record_messages`), a tokenizer without chat template,
            or no prompt left.
    """
    if not tokenizer.chat_template:
        raise DataError("RL prompts are rendered with a chat template; set model.chat_template (e.g. 'chatml')")
    records = load_records(source)[:limit] if limit else load_records(source)
    result = PromptSet([], num_records=len(records))
    seen: set[tuple[int, ...]] = set()
    for i, record in enumerate(records, start=1):
        messages = record_messages(record, data.columns, where=f"{source.path} record #{i}")
        if data.system_prompt not in ("default", "none") and messages[0]["role"] != "system":
            # what the template renders anyway (see tunelab.data.system_prompt); reward functions see it too
            messages.insert(0, {"role": "system", "content": data.system_prompt})
        ids = prompt_ids(tokenizer, messages)  # the ids chat and training use for this prefix
        if tuple(ids) in seen:  # the same prompt twice (e.g. preference pairs sharing a prompt) is kept once
            result.num_duplicates += 1
            continue
        seen.add(tuple(ids))
        if len(ids) > max_prompt_len:
            result.num_too_long += 1
            result.longest_dropped = max(result.longest_dropped, len(ids))
            continue
        result.prompts.append(Prompt(messages, ids, record))
        result.kept_lengths.append(len(ids))
    if not result.prompts:
        raise DataError(f"{source.path}: no prompt left: {result.num_too_long} of {result.num_records} are longer "
                        f"than rl.max_prompt_len={max_prompt_len} tokens (longest {result.longest_dropped})")
    return result


def collate_prompts(prompts: list[Prompt], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts into ``prompt_ids`` (B, P) long and ``prompt_mask`` (B, P) bool."""
    width = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        n = len(prompt.input_ids)
        ids[row, width - n:] = torch.tensor(prompt.input_ids)
        mask[row, width - n:] = True
    return ids, mask
