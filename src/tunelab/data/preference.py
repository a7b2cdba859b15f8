"""Preference data: records → canonical pairs → tokens → ``[chosen; rejected]`` batches.

Record forms (field names can be remapped with ``data.columns``):
  * explicit prompt: ``{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}``;
    a string prompt is one user turn, a string reply one assistant turn; message lists may hold a
    multi-turn prompt (system/user/assistant) and one or more reply turns.
  * implicit prompt: ``{"chosen": messages, "rejected": messages}``: two whole conversations that
    share a prefix; the prompt is their longest common prefix of messages and both remainders must
    start with an assistant turn.
  * optional per-pair margin (reward models): the field named by ``preference.margin_field``.

Rendering: with a chat template, prompt + reply are rendered by the template and exactly the reply's
assistant turns (with their end-of-turn token) are labelled, as in SFT (see
:mod:`tunelab.data.templates`); the template writes every special token (as when the model is
served, :mod:`tunelab.data.encoding`). Without one (base LMs, BERT-like reward encoders), prompt and
reply must be strings and the text is ``prompt + reply + eos``; the tokenizer's own special tokens
(e.g. ``[CLS] … [SEP]``) wrap it. Each side is tokenized whole; a token that overlaps the reply is a
reply token (labelled), and the prompt ids are the tokens both sides share before their replies.

Length policy (``max_seq_len`` tokens per sequence), applied per pair: when prompt + the longer
reply does not fit, the prompt is cut **from the left** (its most recent tokens are kept, after any
leading special token such as BOS/CLS) down to no fewer than ``max_seq_len // 2`` tokens, then the
replies are cut **on the right**. Both sides keep the same prompt tokens. Pairs with an empty
(whitespace-only) reply, or identical replies, are dropped and counted.

Batches (the fixed convention): rows ``0..B-1`` are the chosen sequences, rows ``B..2B-1`` the
rejected ones, so chosen and rejected run in ONE forward pass. Keys:
  * ``input_ids`` (2B, T) int64, ``labels`` (2B, T) int64 with -100 outside the replies,
  * padded: ``attention_mask`` (2B, T) bool; packed: ``position_ids`` (R, T) restarting at each
    sequence and ``sequence_ids`` (R, T) int64, the sequence (0..2B-1, same numbering) each token
    belongs to, -1 on fill,
  * ``pair_index`` (B,) int64 position of each pair in its dataset, ``margin`` (B,) float32,
  * ints ``num_pairs``, ``num_tokens``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.config.schema import DataConfig, DataSource
from tunelab.data.collate import IGNORE_INDEX, packed_collate
from tunelab.data.packing import epoch_index_groups
from tunelab.data.sources import load_records, present_fields
from tunelab.data.encoding import encode_text, special_tokens_around
from tunelab.data.stop_tokens import stop_token_ids
from tunelab.data.templates import UnusableExample, apply_template, render_messages
from tunelab.data.tokenize import DataStats
from tunelab.errors import DataError
from tunelab.training.loop import Batch, BatchPlan

Messages = list[dict[str, str]]


@dataclass
class PreferencePair:
    """One tokenized pair: ids and labels of each side (labels -100 outside the reply)."""

    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    margin: float = 0.0
    index: int = 0

    @property
    def num_tokens(self) -> int:
        """Tokens of both sequences."""
        return len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class PreparedPairs:
    """Tokenized train/held-out pairs, their canonical examples and what was dropped."""

    train: list[PreferencePair]
    validation: list[PreferencePair]
    train_stats: DataStats
    validation_stats: DataStats
    validation_examples: list[dict[str, Any]]


def to_preference_example(record: dict[str, Any], columns: dict[str, str], where: str,
                          margin_field: str | None = None, default_margin: float = 0.0) -> dict[str, Any]:
    """A raw record → ``{"prompt", "chosen", "rejected", "margin"}`` (strings or message lists).

    ``margin`` is the record's ``margin_field`` value where present, else ``default_margin``.

    Raises:
        DataError: missing chosen/rejected, wrong types, or an implicit prompt whose two
            conversations do not diverge at an assistant turn.
    """
    def get(name: str) -> Any:
        return record.get(columns.get(name, name))

    chosen, rejected, prompt = get("chosen"), get("rejected"), get("prompt")
    if chosen is None or rejected is None:
        raise DataError(f"{where}: a preference record needs 'chosen' and 'rejected' "
                        f"(record has {present_fields(record)}); map other names with data.columns")
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if value is not None and not isinstance(value, (str, list)):
            raise DataError(f"{where}: '{name}' must be a string or a list of messages, got {type(value).__name__}")
    if prompt is None:
        prompt, chosen, rejected = _split_implicit(chosen, rejected, where)
    margin = record.get(margin_field) if margin_field else None
    if margin is not None and not isinstance(margin, (int, float)):
        raise DataError(f"{where}: margin field '{margin_field}' must be a number, got {margin!r}")
    return {"prompt": _check_messages(prompt, where), "chosen": _check_messages(chosen, where),
            "rejected": _check_messages(rejected, where),
            "margin": float(margin) if margin is not None else default_margin}


def _split_implicit(chosen: Any, rejected: Any, where: str) -> tuple[Messages, Messages, Messages]:
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(f"{where}: without a 'prompt', chosen and rejected must be whole conversations "
                        "(message lists) sharing a prefix")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    prompt, chosen_tail, rejected_tail = chosen[:shared], chosen[shared:], rejected[shared:]
    for tail in (chosen_tail, rejected_tail):
        if not prompt or not tail or not isinstance(tail[0], dict) or tail[0].get("role") != "assistant":
            raise DataError(f"{where}: implicit prompt: the two conversations must share a non-empty prefix and "
                            "then each continue with an assistant turn")
    return prompt, chosen_tail, rejected_tail


def _check_messages(value: str | list, where: str) -> str | Messages:
    if isinstance(value, str):
        return value
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str) or \
                turn.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"{where}: message {i} needs 'role' (system|user|assistant) and string 'content', "
                            f"got {str(turn)[:80]!r}")
    return [{"role": t["role"], "content": t["content"]} for t in value]


def reply_text(reply: str | Messages) -> str:
    """All text of a reply (string, or the contents of its turns)."""
    return reply if isinstance(reply, str) else "".join(t["content"] for t in reply)


class PairTokenizer:
    """Tokenizes canonical pairs for one tokenizer and ``max_seq_len`` (see the module docstring).

    Prompt/reply boundary: each side is tokenized whole (prompt + reply, so the ids are the ones the
    text really has); a token that overlaps the reply (with byte-level BPE, a prompt's trailing space
    merged into the reply's first word) belongs to the reply and is labelled. The prompt ids are the
    tokens both sides share before their first reply token, so chosen and rejected are conditioned
    on exactly the same ids, and every reply token counts.

    Args:
        tokenizer: a fast transformers tokenizer (offset mapping is needed).
        max_seq_len: longest sequence kept, tokens (>= 8).
    """

    def __init__(self, tokenizer: Any, max_seq_len: int):
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len
        self.prefix_ids, self.suffix_ids = special_tokens_around(tokenizer)
        self.stop_ids = set(stop_token_ids(tokenizer))

    def __call__(self, example: dict[str, Any], stats: DataStats, index: int = 0) -> PreferencePair | None:
        """Tokenize one pair; returns None (and counts the reason in ``stats.dropped``) if dropped."""
        for side in ("chosen", "rejected"):
            if not reply_text(example[side]).strip():
                stats.dropped[f"empty {side} reply"] += 1
                return None
        if example["chosen"] == example["rejected"]:
            stats.dropped["identical replies"] += 1
            return None
        try:
            prompt_ids, replies, templated = self.encode_pair(example["prompt"], example["chosen"], example["rejected"])
        except UnusableExample as err:
            stats.dropped[err.reason] += 1
            return None
        suffix = [] if templated else self.suffix_ids  # a chat template writes its own special tokens
        budget = self.max_seq_len - len(suffix)
        longest = max(len(ids) for ids, _ in replies)
        keep_prompt = len(prompt_ids)
        if keep_prompt + longest > budget:
            stats.num_truncated += 1
            keep_prompt = min(keep_prompt, max(budget - longest, budget // 2))
        head = self._cut_left(prompt_ids, keep_prompt)
        room = budget - len(head)
        sides = []
        for reply_ids, reply_labels in replies:
            ids = head + reply_ids[:room] + suffix
            labels = [IGNORE_INDEX] * len(head) + reply_labels[:room] + [IGNORE_INDEX] * len(suffix)
            labels[0] = IGNORE_INDEX
            if all(x == IGNORE_INDEX for x in labels):
                stats.dropped["no reply tokens after truncation"] += 1
                return None
            sides.append((ids, labels))
        pair = PreferencePair(sides[0][0], sides[0][1], sides[1][0], sides[1][1], example.get("margin", 0.0), index)
        stats.num_examples += 1
        stats.lengths.extend([len(pair.chosen_ids), len(pair.rejected_ids)])
        stats.num_tokens += pair.num_tokens
        stats.num_supervised += sum(x != IGNORE_INDEX for x in pair.chosen_labels + pair.rejected_labels)
        stats.num_replies += 2  # counts sequences (2 per pair)
        stats.num_ending_with_end_of_turn += sum([x for x in labels if x != IGNORE_INDEX][-1] in self.stop_ids
                                                 for _, labels in sides)
        return pair

    def encode_pair(self, prompt: str | Messages, chosen: str | Messages,
                    rejected: str | Messages) -> tuple[list[int], list[tuple[list[int], list[int]]], bool]:
        """The shared prompt ids, each side's reply ids and labels, and whether a chat template wrote the text.

        Raises:
            UnusableExample: a reply that cannot be located in the template's rendering.
        """
        chosen_ids, chosen_labels, chosen_start, templated = self.encode(prompt, chosen)
        rejected_ids, rejected_labels, rejected_start, _ = self.encode(prompt, rejected)
        shared = 0
        while shared < min(chosen_start, rejected_start) and chosen_ids[shared] == rejected_ids[shared]:
            shared += 1
        return (chosen_ids[:shared], [(chosen_ids[shared:], chosen_labels[shared:]),
                                      (rejected_ids[shared:], rejected_labels[shared:])], templated)

    def encode(self, prompt: str | Messages, reply: str | Messages) -> tuple[list[int], list[int], int, bool]:
        """Ids and labels of prompt + reply, the index of the first token that reaches into the
        reply, and whether a chat template wrote the text (see :mod:`tunelab.data.encoding`)."""
        text, prompt_len, spans, templated = self.render(prompt, reply)
        ids, offsets = encode_text(self.tokenizer, text, templated)
        labels = [tok if end > start and any(start < e and end > s for s, e in spans) else IGNORE_INDEX
                  for tok, (start, end) in zip(ids, offsets)]
        first = next((j for j, (start, end) in enumerate(offsets) if end > start and end > prompt_len), len(ids))
        return ids, labels, first, templated

    def render(self, prompt: str | Messages, reply: str | Messages) -> tuple[str, int, list[tuple[int, int]], bool]:
        """Text of prompt + reply, the prompt's length in characters, the reply's labelled spans,
        and whether a chat template wrote it.

        Raises:
            DataError: message lists without a chat template.
            UnusableExample: the template renders the prompt differently once the reply follows.
        """
        tok = self.tokenizer
        if not tok.chat_template:
            if not (isinstance(prompt, str) and isinstance(reply, str)):
                raise DataError("message-list preference data needs a chat template; set model.chat_template "
                                "(e.g. 'chatml') or give prompt/chosen/rejected as strings")
            text = prompt + reply + (tok.eos_token or "")
            return text, len(prompt), [(len(prompt), len(text))], False
        prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        reply_msgs = [{"role": "assistant", "content": reply}] if isinstance(reply, str) else reply
        prompt_text = apply_template(tok, prompt_msgs, add_generation_prompt=True)
        supervise = "last_turn" if len(reply_msgs) == 1 else "assistant"
        rendering = render_messages(tok, prompt_msgs + reply_msgs, supervise)
        rendered = rendering.examples[0]
        if rendering.per_reply or not rendered.text.startswith(prompt_text):
            raise UnusableExample("chat template renders the prompt differently once the reply follows")
        return rendered.text, len(prompt_text), [s for s in rendered.spans if s[1] > len(prompt_text)], True

    def _cut_left(self, prompt_ids: list[int], keep: int) -> list[int]:
        if keep >= len(prompt_ids):
            return list(prompt_ids)
        lead = len(self.prefix_ids) if prompt_ids[: len(self.prefix_ids)] == self.prefix_ids else 0
        return prompt_ids[:lead] + prompt_ids[len(prompt_ids) - (keep - lead):]


def load_preference_examples(source: DataSource, cfg: DataConfig, margin_field: str | None = None,
                             default_margin: float = 0.0, limit: int | None = None) -> list[dict[str, Any]]:
    """Canonical preference examples of one data source (see :func:`to_preference_example`)."""
    records = load_records(source)[:limit]
    if not records:
        raise DataError(f"{source.path}: no records")
    return [to_preference_example(r, cfg.columns, f"{source.path} record #{i}", margin_field, default_margin)
            for i, r in enumerate(records, start=1)]


def tokenize_pairs(examples: list[dict[str, Any]], encode: PairTokenizer,
                   first_index: int = 0) -> tuple[list[PreferencePair], DataStats]:
    """Tokenize canonical pairs, numbering kept pairs from ``first_index`` (``pair_index``), counting drops."""
    stats, pairs = DataStats(num_records=len(examples)), []
    for example in examples:
        pair = encode(example, stats, index=first_index + len(pairs))
        if pair is not None:
            pairs.append(pair)
    return pairs, stats


def prepare_pairs(cfg: DataConfig, tokenizer: Any, seed: int, margin_field: str | None = None,
                  default_margin: float = 0.0) -> PreparedPairs:
    """Load, split and tokenize preference data as configured (held-out: ``cfg.validation`` or
    a seeded ``cfg.val_fraction`` of train). Held-out pairs are numbered after the training pairs,
    so every ``pair_index`` is unique across both splits.

    Raises:
        DataError: bad records, or no training pair left (the message gives the drop counts).
    """
    train = load_preference_examples(cfg.train, cfg, margin_field, default_margin, cfg.max_examples)
    if cfg.validation is not None:
        held = load_preference_examples(cfg.validation, cfg, margin_field, default_margin,
                                        cfg.max_validation_examples)
    elif cfg.val_fraction > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        chosen = set(order[: max(1, round(cfg.val_fraction * len(order)))])
        held = [e for i, e in enumerate(train) if i in chosen]
        train = [e for i, e in enumerate(train) if i not in chosen]
    else:
        held = []
    encode = PairTokenizer(tokenizer, cfg.max_seq_len)
    train_pairs, train_stats = tokenize_pairs(train, encode)
    held_pairs, held_stats = tokenize_pairs(held, encode, first_index=len(train_pairs))
    if not train_pairs:
        raise DataError(f"{cfg.train.path}: no training pair left of {train_stats.num_records} records "
                        f"(dropped: {dict(train_stats.dropped) or 'none'})")
    if cfg.validation is not None and not held_pairs:
        raise DataError(f"{cfg.validation.path}: no held-out pair left of {held_stats.num_records} records "
                        f"(dropped: {dict(held_stats.dropped) or 'none'})")
    return PreparedPairs(train_pairs, held_pairs, train_stats, held_stats, held)


def preference_collate(pairs: Sequence[PreferencePair], pad_token_id: int,
                       padding_side: str = "right") -> dict[str, Any]:
    """Pad ``[chosen_0..chosen_{B-1}; rejected_0..rejected_{B-1}]`` into one (2B, T) batch.

    Args:
        padding_side: ``right`` (training) or ``left``; scores and log-probs do not depend on it.
    """
    seqs = [(p.chosen_ids, p.chosen_labels) for p in pairs] + [(p.rejected_ids, p.rejected_labels) for p in pairs]
    longest = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), longest), dtype=torch.bool)
    for row, (ids, labs) in enumerate(seqs):
        cols = slice(0, len(ids)) if padding_side == "right" else slice(longest - len(ids), longest)
        input_ids[row, cols], labels[row, cols], attention_mask[row, cols] = torch.tensor(ids), torch.tensor(labs), True
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, **_pair_fields(pairs)}


def preference_packed_collate(rows: Sequence[Sequence[PreferencePair]], pad_token_id: int) -> dict[str, Any]:
    """Pack pairs into rows (each pair's chosen then rejected side by side, position_ids restarting).

    Pairs are numbered in row order (row 0's pairs first); ``sequence_ids`` give chosen of pair k
    id ``k`` and its rejected id ``B + k``, the same numbering as :func:`preference_collate`.
    """
    flat = [p for row in rows for p in row]
    num_pairs = len(flat)
    batch = packed_collate([[s for p in row for s in ((p.chosen_ids, p.chosen_labels),
                                                      (p.rejected_ids, p.rejected_labels))] for row in rows],
                           pad_token_id)
    sequence_ids = torch.full_like(batch["input_ids"], -1)
    k = 0
    for r, row in enumerate(rows):
        start = 0
        for pair in row:
            for seq_id, length in ((k, len(pair.chosen_ids)), (num_pairs + k, len(pair.rejected_ids))):
                sequence_ids[r, start:start + length] = seq_id
                start += length
            k += 1
    return {**batch, "sequence_ids": sequence_ids, **_pair_fields(flat)}


def _pair_fields(pairs: Sequence[PreferencePair]) -> dict[str, Any]:
    return {"pair_index": torch.tensor([p.index for p in pairs], dtype=torch.long),
            "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32),
            "num_pairs": len(pairs), "num_tokens": sum(p.num_tokens for p in pairs)}


def preference_batch_plan(pairs: list[PreferencePair], *, batch_size: int, max_seq_len: int, packing: bool,
                          shuffle: bool, seed: int, pad_token_id: int) -> BatchPlan:
    """Micro-batches of pairs, deterministic per epoch (seed ``seed + epoch``).

    Unpacked: ``batch_size`` pairs per micro-batch, right-padded. Packed: pairs are packed
    best-fit-decreasing into rows of at most ``2 * max_seq_len`` tokens (a pair never splits
    across rows) and ``batch_size`` rows form a micro-batch (see
    :func:`tunelab.data.packing.epoch_index_groups`).
    """
    num_micro, groups = epoch_index_groups([p.num_tokens for p in pairs], capacity=2 * max_seq_len,
                                           batch_size=batch_size, packing=packing, shuffle=shuffle, seed=seed)

    def make_epoch(epoch: int) -> list[Batch]:
        if packing:
            return [preference_packed_collate([[pairs[i] for i in row] for row in g], pad_token_id)
                    for g in groups(epoch)]
        return [preference_collate([pairs[row[0]] for row in g], pad_token_id) for g in groups(epoch)]

    return BatchPlan(micro_batches_per_epoch=max(num_micro, 1), make_epoch=make_epoch)
