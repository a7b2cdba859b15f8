"""Rendered text → ``input_ids`` and ``labels``, with the length policy and drop accounting.

Conventions: ``labels`` are aligned with ``input_ids`` (the loss shifts them), ``-100`` marks a
token that does not count. ``labels[0]`` is always ``-100`` because no position predicts the
first token; this keeps supervised-token counts identical whether examples are packed or not.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.templates import Rendered, render

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    """One training example: ``input_ids`` and ``labels`` (same length, tokens)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_supervised(self) -> int:
        """Tokens that count in the loss."""
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class DataStats:
    """What happened to the records of one dataset on their way to the loss."""

    num_records: int = 0
    num_examples: int = 0
    num_truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    num_tokens: int = 0
    num_supervised: int = 0
    num_ending_with_eos: int = 0

    def summary(self) -> dict[str, Any]:
        """Plain-dict view for logs and ``data inspect``."""
        return {
            "records": self.num_records,
            "examples": self.num_examples,
            "truncated": self.num_truncated,
            "dropped": dict(self.dropped),
            "tokens": self.num_tokens,
            "supervised_tokens": self.num_supervised,
            "supervised_fraction": round(self.num_supervised / max(self.num_tokens, 1), 4),
            "examples_ending_reply_with_eos": self.num_ending_with_eos,
        }


class Tokenizer:
    """Tokenizes rendered examples for one tokenizer and one length policy.

    Args:
        tokenizer: a fast transformers tokenizer (offset mapping is needed).
        max_seq_len: longest example kept, in tokens.
        overlong: ``truncate`` (keep the first ``max_seq_len`` tokens) or ``drop``; raw text is
            split into ``max_seq_len`` blocks instead.
        supervise: see :func:`tunelab.data.templates.render`.
    """

    def __init__(self, tokenizer: Any, max_seq_len: int, overlong: str, supervise: str):
        self.tokenizer, self.max_seq_len, self.overlong, self.supervise = tokenizer, max_seq_len, overlong, supervise
        probe = tokenizer("a", add_special_tokens=True).input_ids
        bos = tokenizer.bos_token_id
        self.add_bos = bos is not None and len(probe) > 0 and probe[0] == bos
        self.eos_ids = {i for i in (tokenizer.eos_token_id,) if i is not None}

    def __call__(self, example: dict[str, Any], stats: DataStats) -> list[TokenizedExample]:
        """Tokenize one canonical example; returns 0, 1 (or, for raw text, several) examples.

        Dropped examples are counted in ``stats.dropped`` under their reason.
        """
        rendered = render(self.tokenizer, example, self.supervise)
        input_ids, labels = self.encode(rendered)
        if "text" in example:
            pieces = [(input_ids[i : i + self.max_seq_len], labels[i : i + self.max_seq_len])
                      for i in range(0, len(input_ids), self.max_seq_len)]
        elif len(input_ids) > self.max_seq_len:
            if self.overlong == "drop":
                stats.dropped["longer than max_seq_len"] += 1
                return []
            stats.num_truncated += 1
            pieces = [(input_ids[: self.max_seq_len], labels[: self.max_seq_len])]
        else:
            pieces = [(input_ids, labels)]
        out = []
        for ids, labs in pieces:
            labs = [IGNORE_INDEX, *labs[1:]]
            example_out = TokenizedExample(list(ids), labs)
            if example_out.num_supervised == 0:
                stats.dropped["no supervised tokens" + (" after truncation" if len(input_ids) > len(ids) else "")] += 1
                continue
            out.append(example_out)
            stats.num_examples += 1
            stats.lengths.append(len(ids))
            stats.num_tokens += len(ids)
            stats.num_supervised += example_out.num_supervised
            last = max((i for i, x in enumerate(labs) if x != IGNORE_INDEX), default=-1)
            stats.num_ending_with_eos += int(labs[last] in self.eos_ids)
        return out

    def encode(self, rendered: Rendered) -> tuple[list[int], list[int]]:
        """Token ids of the rendered text, and labels that copy ids inside supervised spans."""
        enc = self.tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if self.add_bos and not rendered.text.startswith(self.tokenizer.bos_token):
            ids, offsets = [self.tokenizer.bos_token_id, *ids], [(0, 0), *offsets]
        labels = [IGNORE_INDEX] * len(ids)
        spans = rendered.spans
        for j, (start, end) in enumerate(offsets):
            if end > start and any(s <= start < e for s, e in spans):
                labels[j] = ids[j]
        return ids, labels
