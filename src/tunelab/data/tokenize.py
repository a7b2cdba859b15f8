"""Rendered text → ``input_ids`` and ``labels``, with the length policy and drop accounting.

Conventions: ``labels`` are aligned with ``input_ids`` (the loss shifts them), ``-100`` marks a
token that does not count. ``labels[0]`` is always ``-100`` because no position predicts the
first token; this keeps supervised-token counts identical whether examples are packed or not.

Supervision comes from character offsets: a token counts when its characters overlap a supervised
span. With byte-level BPE a prompt that ends in a space merges that space into the reply's first
token (``"A: "`` + ``"Paris"`` → ``"A", ":", " Paris"``); that token overlaps the reply, so it is
learned (it is never left untrained because it starts one character early).

Raw text (format ``text``, folders of text files) is one document per record: the tokenizer's own
BOS in front (the plain-text policy of :mod:`tunelab.data.encoding`) and EOS at the end, both once
per document, never per chunk. A document longer than ``max_seq_len`` is cut by
:func:`chunk_document` into chunks that never cross documents, with every token after the first
a target exactly once (see there for the stride policy).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.encoding import encode_text
from tunelab.data.stop_tokens import stop_token_ids
from tunelab.data.templates import Rendered, UnusableExample, render

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    """One training example: ``input_ids`` and ``labels`` (same length, tokens); ``source`` names the
    document it comes from (a file of a text-file source), or is None."""

    input_ids: list[int]
    labels: list[int]
    source: str | None = None

    @property
    def num_supervised(self) -> int:
        """Tokens that count in the loss."""
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class DataStats:
    """What happened to the records of one dataset on their way to the loss.

    ``num_replies`` counts the replies kept (for raw text: documents), ``num_ending_with_end_of_turn``
    those whose last supervised token is the template's end-of-turn token or EOS (see
    :func:`tunelab.data.stop_tokens.stop_token_ids`); ``num_split`` the conversations turned into one
    example per reply because the template is not prefix-stable.
    """

    num_records: int = 0
    num_examples: int = 0
    num_truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    lengths: list[int] = field(default_factory=list)
    num_tokens: int = 0
    num_supervised: int = 0
    num_replies: int = 0
    num_ending_with_end_of_turn: int = 0
    num_split: int = 0
    num_duplicates: int = 0
    sources: Counter = field(default_factory=Counter)

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
            "replies": self.num_replies,
            "replies_ending_with_end_of_turn": self.num_ending_with_end_of_turn,
            "conversations_split_per_reply": self.num_split,
            **({"duplicate_chunks_removed": self.num_duplicates} if self.num_duplicates else {}),
            **({"files": sum(n > 0 for n in self.sources.values())} if self.sources else {}),
        }


class Tokenizer:
    """Tokenizes rendered examples for one tokenizer and one length policy.

    Args:
        tokenizer: a fast transformers tokenizer (offset mapping is needed).
        max_seq_len: longest example kept, in tokens.
        overlong: ``truncate`` (keep the first ``max_seq_len`` tokens) or ``drop``; raw text is
            chunked instead (:func:`chunk_document`).
        supervise: see :func:`tunelab.data.templates.render`.
        stride: raw text: tokens between the starts of consecutive chunks of a document
            (``None`` = ``max_seq_len - 1``); see :func:`chunk_document`.
    """

    def __init__(self, tokenizer: Any, max_seq_len: int, overlong: str, supervise: str, stride: int | None = None):
        self.tokenizer, self.max_seq_len, self.overlong, self.supervise = tokenizer, max_seq_len, overlong, supervise
        self.stride = stride
        self.stop_ids = set(stop_token_ids(tokenizer))

    def __call__(self, example: dict[str, Any], stats: DataStats) -> list[TokenizedExample]:
        """Tokenize one canonical example; returns 0, 1 or several examples (raw text blocks, or
        one per reply for a template that is not prefix-stable).

        Dropped examples are counted in ``stats.dropped`` under their reason.
        """
        try:
            rendering = render(self.tokenizer, example, self.supervise)
        except UnusableExample as err:
            stats.dropped[err.reason] += 1
            return []
        stats.num_split += int(rendering.per_reply)
        out = []
        for rendered in rendering.examples:
            out.extend(self._tokenize(rendered, "text" in example, stats))
        source = example.get("source") if "text" in example else None
        if source is not None:
            for tokenized in out:
                tokenized.source = source
            stats.sources[source] += len(out)
        return out

    def _tokenize(self, rendered: Rendered, raw_text: bool, stats: DataStats) -> list[TokenizedExample]:
        input_ids, labels, reply_ends = self.encode(rendered)
        if raw_text:
            pieces = chunk_document(input_ids, labels, self.max_seq_len, self.stride)
        elif len(input_ids) > self.max_seq_len:
            if self.overlong == "drop":
                stats.dropped["longer than max_seq_len"] += 1
                return []
            stats.num_truncated += 1
            pieces = [(input_ids[: self.max_seq_len], labels[: self.max_seq_len])]
        else:
            pieces = [(input_ids, labels)]
        out, kept = [], 0
        for ids, labs in pieces:
            labs = [IGNORE_INDEX, *labs[1:]]
            example_out = TokenizedExample(list(ids), labs)
            if example_out.num_supervised == 0:
                stats.dropped["no supervised tokens" + (" after truncation" if len(input_ids) > len(ids) else "")] += 1
                continue
            out.append(example_out)
            kept = max(kept, len(ids) if not raw_text else len(input_ids))
            stats.num_examples += 1
            stats.lengths.append(len(ids))
            stats.num_tokens += len(ids)
            stats.num_supervised += example_out.num_supervised
        if out:
            stats.num_replies += len(reply_ends)
            stats.num_ending_with_end_of_turn += sum(0 <= j < kept and input_ids[j] in self.stop_ids
                                                     for j in reply_ends)
        return out

    def encode(self, rendered: Rendered) -> tuple[list[int], list[int], list[int]]:
        """Token ids of the rendered text, labels that copy ids of tokens overlapping a supervised
        span, and for each reply the index of its last token (-1 if it has none)."""
        ids, offsets = encode_text(self.tokenizer, rendered.text, rendered.templated)
        labels = [IGNORE_INDEX] * len(ids)
        for j, (start, end) in enumerate(offsets):
            if end > start and any(start < e and end > s for s, e in rendered.spans):
                labels[j] = ids[j]
        replies = rendered.replies or ((0, len(rendered.text)),)
        reply_ends = [max((j for j, (start, end) in enumerate(offsets) if end > start and start < e and end > s),
                          default=-1) for s, e in replies]
        return ids, labels, reply_ends


def chunk_document(input_ids: list[int], labels: list[int], max_seq_len: int,
                   stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Cut one document's ids and labels (length n) into chunks of at most ``max_seq_len`` tokens.

    Stride policy: chunk ``k`` holds tokens ``[k·stride, min(k·stride + max_seq_len, n))``; chunks
    follow until one reaches the end (the last may be shorter). ``stride`` defaults to
    ``max_seq_len - 1``: consecutive chunks share one token, so the token that opens a chunk (which
    no position of that chunk predicts) was a target at the end of the previous one. A smaller
    stride gives later chunks more context: the tokens a chunk shares with the previous one are
    context only (label ``-100``), so every token of the document but the first is a target exactly
    once, whatever the stride (the sliding-window evaluation of Press et al. 2021, arXiv:2012.15832,
    §2, applied to training chunks). A chunk never holds tokens of two documents.

    Args:
        input_ids, labels: one document's tokens and labels (``-100`` = not a target), same length.
        stride: tokens between chunk starts, ``1 ≤ stride ≤ max_seq_len - 1`` (None = ``max_seq_len - 1``).

    Returns:
        ``(ids, labels)`` per chunk; a document of at most ``max_seq_len`` tokens is one chunk as is.

    Raises:
        ValueError: ``stride`` outside ``[1, max_seq_len - 1]``.
    """
    stride = max_seq_len - 1 if stride is None else stride
    if not 1 <= stride <= max_seq_len - 1:
        raise ValueError(f"chunk stride {stride} must be between 1 and max_seq_len - 1 = {max_seq_len - 1}")
    chunks, start, covered, n = [], 0, 0, len(input_ids)
    while True:
        end = min(start + max_seq_len, n)
        first_target = max(covered, start + 1)  # a chunk's first token is never its own target
        chunks.append((list(input_ids[start:end]),
                       [IGNORE_INDEX if j < first_target else labels[j] for j in range(start, end)]))
        if end >= n:
            return chunks
        start, covered = start + stride, end
