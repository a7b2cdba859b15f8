"""Unpaired preference data for KTO: records → labelled completions → tokens → KTO batches.

Record forms (field names can be remapped with ``data.columns``):
  * unpaired: ``{"prompt": str | messages, "completion": str | messages, "label": true | false}``;
    ``label: true`` marks a desirable completion (thumbs up), ``false`` an undesirable one. The label
    must be a JSON boolean (``1``/``"yes"`` are refused, so a misread column cannot pass silently).
  * paired (any form :mod:`tunelab.data.preference` reads): each pair becomes two examples, the
    chosen reply desirable and the rejected reply undesirable, with the same prompt.

Tokens: prompt and completion are rendered and labelled exactly as one side of a preference pair
(:meth:`tunelab.data.preference.PairTokenizer.encode`: chat template, supervised assistant turns, the
prompt/reply boundary at the first token reaching into the reply; the same length policy: prompt
cut from the left to no fewer than ``max_seq_len // 2`` tokens, then the completion cut on the
right). A mismatched sequence joins example i's prompt ids to example j's completion ids; with a
chat template the boundary is the template's assistant header, so these are the ids the text has;
without one (plain ``prompt + completion`` text) a BPE merge across the join may differ from
tokenizing the joined text, which only affects the ``z_ref`` estimate.

Batches (Ethayarajh et al. 2024, arXiv:2402.01306, Sec. 4.1: the reference point ``z_ref`` is
estimated from mismatched pairs within the batch): for B examples the padded batch has ``2B`` rows,
rows ``0..B-1`` the examples ``x_i + y_i``, rows ``B..2B-1`` the mismatched sequences
``x_i + y_{m(i)}``, the prompt of example i with the completion of example ``m(i)``, where ``m(i)``
is the next example after i (cyclically, in batch order) whose prompt differs from ``x_i``. So no
example is ever paired with its own completion, nor with another answer to its own prompt, at any
batch size: with B = 2 and two prompts the two completions swap; with B = 1, or when every
example of the batch shares one prompt, there is no mismatched pair: that row repeats the example
and ``kl_mask`` is False there (the loss then uses ``z_ref = 0`` and reports ``kto/kl_pairs = 0``).
Keys: ``input_ids``, ``labels``, ``attention_mask`` (2B, T); ``desirable``, ``kl_mask`` (B,) bool;
``pair_index`` (B,) the examples' indices; ``num_pairs`` (= B, examples in the batch),
``num_tokens``. The ``[examples; mismatched]`` layout is the ``[chosen; rejected]`` layout of
:mod:`tunelab.models.logps`, so the same policy/reference log-prob code serves both.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.config.schema import DataConfig, DataSource
from tunelab.data.collate import IGNORE_INDEX
from tunelab.data.preference import PairTokenizer, reply_text, to_preference_example
from tunelab.data.sources import load_records, present_fields
from tunelab.data.templates import UnusableExample
from tunelab.data.tokenize import DataStats
from tunelab.errors import DataError
from tunelab.training.loop import Batch, BatchPlan


@dataclass
class KTOExample:
    """One tokenized example: prompt tokens, completion tokens and labels, desirable or not.

    ``prompt_key`` is the same for examples with the same prompt (the mismatch rule reads it).
    """

    prompt_ids: list[int]
    reply_ids: list[int]
    reply_labels: list[int]
    desirable: bool
    prompt_key: int
    index: int = 0
    pair_id: int | None = None
    suffix_ids: list[int] = field(default_factory=list)  # special tokens after the text (none with a chat template)


@dataclass
class PreparedKTO:
    """Train and held-out examples with their statistics, and the held-out pairs: ``(index of the
    desirable example, index of the undesirable one)`` (``KTOExample.index``) for each held-out record
    that was a pair with both sides kept (for DPO-comparable preference accuracy)."""

    train: list[KTOExample]
    validation: list[KTOExample]
    validation_pairs: list[tuple[int, int]]
    train_stats: DataStats
    validation_stats: DataStats
    validation_examples: list[dict[str, Any]]


def to_kto_examples(record: dict[str, Any], columns: dict[str, str], where: str) -> list[dict[str, Any]]:
    """Canonical ``{prompt, completion, desirable}`` examples of one record (one, or two from a pair).

    Raises:
        DataError: neither form, a non-boolean label, or a bad prompt/completion.
    """
    def get(name: str) -> Any:
        return record.get(columns.get(name, name))

    label = get("label")
    if label is None:
        if get("chosen") is None and get("rejected") is None:
            raise DataError(f"{where}: a KTO record needs 'prompt', 'completion' and 'label' (true/false), or "
                            f"'chosen' and 'rejected' (record has {present_fields(record)}); map names with "
                            "data.columns")
        pair = to_preference_example(record, columns, where)
        return [{"prompt": pair["prompt"], "completion": pair["chosen"], "desirable": True},
                {"prompt": pair["prompt"], "completion": pair["rejected"], "desirable": False}]
    if not isinstance(label, bool):
        raise DataError(f"{where}: 'label' must be true or false (JSON boolean), got {label!r}")
    prompt, completion = get("prompt"), get("completion")
    for name, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, (str, list)):
            raise DataError(f"{where}: '{name}' must be a string or a list of messages, got "
                            f"{type(value).__name__}")
    checked = to_preference_example({"prompt": prompt, "chosen": completion, "rejected": completion}, {}, where)
    return [{"prompt": checked["prompt"], "completion": checked["chosen"], "desirable": label}]


def _prompt_key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else repr(prompt)


def tokenize_kto(examples: list[dict[str, Any]], encode: PairTokenizer,
                 keys: dict[str, int], first_index: int = 0) -> tuple[list[KTOExample], DataStats]:
    """Tokenize canonical examples (``keys`` numbers distinct prompts, shared across splits)."""
    stats, out = DataStats(num_records=len(examples)), []
    for example in examples:
        if not reply_text(example["completion"]).strip():
            stats.dropped["empty completion"] += 1
            continue
        try:
            all_ids, all_labels, first, templated = encode.encode(example["prompt"], example["completion"])
        except UnusableExample as err:
            stats.dropped[err.reason] += 1
            continue
        prompt_ids, reply_ids, labels = all_ids[:first], all_ids[first:], all_labels[first:]
        suffix = [] if templated else list(encode.suffix_ids)  # a chat template writes its own special tokens
        ids, labs = _sequence(prompt_ids, reply_ids, labels, suffix, encode, stats)
        if all(x == IGNORE_INDEX for x in labs):
            stats.dropped["no completion tokens after truncation"] += 1
            continue
        key = keys.setdefault(_prompt_key(example["prompt"]), len(keys))
        out.append(KTOExample(prompt_ids, reply_ids, labels, bool(example["desirable"]), key,
                              first_index + len(out), example.get("pair_id"), suffix))
        stats.num_examples += 1
        stats.lengths.append(len(ids))
        stats.num_tokens += len(ids)
        stats.num_supervised += sum(x != IGNORE_INDEX for x in labs)
    return out, stats


def _sequence(prompt_ids: list[int], reply_ids: list[int], reply_labels: list[int], suffix: list[int],
              encode: PairTokenizer, stats: DataStats | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels of prompt + reply + suffix under the length policy (see the module docstring)."""
    budget = encode.max_seq_len - len(suffix)
    keep = len(prompt_ids)
    if keep + len(reply_ids) > budget:
        if stats is not None:
            stats.num_truncated += 1
        keep = min(keep, max(budget - len(reply_ids), budget // 2))
    lead = len(encode.prefix_ids) if prompt_ids[: len(encode.prefix_ids)] == encode.prefix_ids else 0
    head = list(prompt_ids) if keep >= len(prompt_ids) else prompt_ids[:lead] + prompt_ids[len(prompt_ids) - (keep - lead):]
    room = budget - len(head)
    ids = head + reply_ids[:room] + suffix
    labels = [IGNORE_INDEX] * len(head) + reply_labels[:room] + [IGNORE_INDEX] * len(suffix)
    labels[0] = IGNORE_INDEX
    return ids, labels


def mismatched_partners(prompt_keys: Sequence[int]) -> list[int | None]:
    """For each position i, the next position j (cyclically) whose prompt key differs, else None.

    ``j != i`` always, so no example meets its own completion; None (no such j) for a batch of one
    or a batch whose examples all share one prompt.
    """
    size = len(prompt_keys)
    partners: list[int | None] = []
    for i in range(size):
        partners.append(next((j % size for j in range(i + 1, i + size)
                              if prompt_keys[j % size] != prompt_keys[i]), None))
    return partners


def kto_collate(examples: Sequence[KTOExample], encode: PairTokenizer, pad_token_id: int) -> dict[str, Any]:
    """Pad ``[x_i + y_i ...; x_i + y_m(i) ...]`` into one right-padded (2B, T) batch (module docstring)."""
    partners = mismatched_partners([e.prompt_key for e in examples])
    seqs = [_sequence(e.prompt_ids, e.reply_ids, e.reply_labels, e.suffix_ids, encode) for e in examples]
    for e, j in zip(examples, partners):
        other = examples[j] if j is not None else e
        seqs.append(_sequence(e.prompt_ids, other.reply_ids, other.reply_labels, e.suffix_ids, encode))
    longest = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), longest), dtype=torch.bool)
    for row, (ids, labs) in enumerate(seqs):
        input_ids[row, : len(ids)], labels[row, : len(ids)] = torch.tensor(ids), torch.tensor(labs)
        attention_mask[row, : len(ids)] = True
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "desirable": torch.tensor([e.desirable for e in examples], dtype=torch.bool),
            "kl_mask": torch.tensor([j is not None for j in partners], dtype=torch.bool),
            "pair_index": torch.tensor([e.index for e in examples], dtype=torch.long),
            "num_pairs": len(examples), "num_tokens": sum(len(ids) for ids, _ in seqs[: len(examples)])}


def kto_batch_plan(examples: list[KTOExample], encode: PairTokenizer, *, batch_size: int, shuffle: bool, seed: int,
                   pad_token_id: int) -> BatchPlan:
    """Micro-batches of ``batch_size`` examples, order deterministic per epoch (seed ``seed + epoch``)."""
    def make_epoch(epoch: int) -> list[Batch]:
        order = list(range(len(examples)))
        if shuffle:
            random.Random(seed + epoch).shuffle(order)
        return [kto_collate([examples[i] for i in order[k:k + batch_size]], encode, pad_token_id)
                for k in range(0, len(order), batch_size)]

    return BatchPlan(micro_batches_per_epoch=max(-(-len(examples) // batch_size), 1), make_epoch=make_epoch)


def _load(source: DataSource, cfg: DataConfig, limit: int | None = None) -> list[dict[str, Any]]:
    records = load_records(source)[:limit]
    if not records:
        raise DataError(f"{source.path}: no records")
    return records


def prepare_kto(cfg: DataConfig, tokenizer: Any, seed: int) -> PreparedKTO:
    """Load, split (by record, so both halves of a pair stay together) and tokenize KTO data.

    Held-out: ``cfg.validation`` or a seeded ``cfg.val_fraction`` of the training records.

    Raises:
        DataError: bad records, or no training example left (the message gives the drop counts).
    """
    train = _load(cfg.train, cfg, cfg.max_examples)
    if cfg.validation is not None:
        held = _load(cfg.validation, cfg, cfg.max_validation_examples)
    elif cfg.val_fraction > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        chosen = set(order[: max(1, round(cfg.val_fraction * len(order)))])
        held, train = [r for i, r in enumerate(train) if i in chosen], [r for i, r in enumerate(train) if i not in chosen]
    else:
        held = []
    name = cfg.train.path
    train_ex = [e for i, r in enumerate(train, 1) for e in to_kto_examples(r, cfg.columns, f"{name} record #{i}")]
    held_ex = []
    for i, record in enumerate(held, 1):
        examples = to_kto_examples(record, cfg.columns, f"held-out record #{i}")
        held_ex += [{**e, "pair_id": i} for e in examples] if len(examples) == 2 else examples
    encode, keys = PairTokenizer(tokenizer, cfg.max_seq_len), {}
    train_examples, train_stats = tokenize_kto(train_ex, encode, keys)
    held_examples, held_stats = tokenize_kto(held_ex, encode, keys, first_index=len(train_examples))
    train_stats.num_records, held_stats.num_records = len(train), len(held)  # records, not examples
    if not train_examples:
        raise DataError(f"no training example left of {len(train_ex)} "
                        f"(dropped: {dict(train_stats.dropped) or 'none'})")
    sides: dict[int, dict[bool, int]] = {}
    for e in held_examples:
        if e.pair_id is not None:
            sides.setdefault(e.pair_id, {})[e.desirable] = e.index
    pairs = [(s[True], s[False]) for s in sides.values() if len(s) == 2]
    prompts = [{"prompt": e["prompt"]} for e in held_ex]
    return PreparedKTO(train_examples, held_examples, pairs, train_stats, held_stats, prompts)
