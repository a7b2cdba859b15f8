"""Classification records → token ids + label targets, and their micro-batches.

A record holds ``classification.text_field`` (and optionally ``text_pair_field``) and
``label_field``. Labels become targets through a :class:`LabelSpace`:
  * ``single_label``: a name or int → class id (int64),
  * ``multi_label``: a list of names/ids → multi-hot float vector (K,),
  * ``regression``: a number or list of numbers → float vector (K,).

Batch keys (B rows, T tokens): ``input_ids`` (B, T) int64, ``attention_mask`` (B, T) int64 (1 on
real tokens), optional ``token_type_ids`` (B, T) int64, ``labels`` (B,) int64 for single_label or
(B, K) float32 otherwise; plus ints ``num_examples`` and ``num_tokens``.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.config.classification import ClassificationConfig
from tunelab.config.schema import Config, DataSource
from tunelab.data.sources import load_records, present_fields
from tunelab.errors import ConfigError, DataError
from tunelab.training.loop import Batch, BatchPlan

Target = int | list[float]


@dataclass
class LabelSpace:
    """The label names in id order and how a raw label value becomes a training target."""

    problem_type: str
    names: list[str]

    @property
    def num_labels(self) -> int:
        """Outputs of the head (K)."""
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        """Id → name, as stored in the model's ``config.json``."""
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        """Name → id, as stored in the model's ``config.json``."""
        return {name: i for i, name in enumerate(self.names)}

    def encode(self, value: Any, where: str) -> Target:
        """Target for one raw label value; raises :class:`DataError` naming ``where`` if invalid."""
        if self.problem_type == "regression":
            values = value if isinstance(value, list) else [value]
            if len(values) != self.num_labels or not all(_is_number(v) for v in values):
                raise DataError(f"{where}: regression label must be {self.num_labels} number(s), got {value!r}")
            return [float(v) for v in values]
        if self.problem_type == "multi_label":
            if not isinstance(value, list):
                raise DataError(f"{where}: multi_label label must be a list of label names, got {value!r}")
            hot = [0.0] * self.num_labels
            for item in value:
                hot[self._class_id(item, where)] = 1.0
            return hot
        return self._class_id(value, where)

    def _class_id(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or value is None or isinstance(value, (list, dict, float)):
            raise DataError(f"{where}: label must be a name or an int id, got {value!r}")
        key = str(value).strip()
        if key in self.label2id:
            return self.label2id[key]
        if isinstance(value, int) and not _all_ints(self.names) and 0 <= value < self.num_labels:
            return value
        raise DataError(f"{where}: unknown label {value!r}; known labels: {self.names} "
                        "(set classification.labels to list every label)")


def build_label_space(cc: ClassificationConfig, records: list[dict[str, Any]], where: str) -> LabelSpace:
    """Label names from ``classification.labels`` or, if unset, from the training records.

    Raises:
        DataError: a record lacks the label field, or fewer than 2 classes are found.
    """
    if cc.labels is not None:
        return LabelSpace(cc.problem_type, list(cc.labels))
    values = [_label_of(r, cc, f"{where} record #{i}") for i, r in enumerate(records, start=1)]
    if cc.problem_type == "regression":
        first = values[0] if values else None
        if isinstance(first, list):
            return LabelSpace("regression", [f"{cc.label_field}_{i}" for i in range(len(first))])
        return LabelSpace("regression", [cc.label_field])
    seen = {str(v).strip() for value in values for v in (value if isinstance(value, list) else [value])}
    names = sorted(seen, key=int) if _all_ints(seen) else sorted(seen)
    if cc.problem_type == "single_label" and len(names) < 2:
        raise DataError(f"{where}: single_label needs at least 2 classes, found {names}")
    return LabelSpace(cc.problem_type, names)


@dataclass
class ClassificationExample:
    """One tokenized text (pair) with its target (None for unlabelled prediction inputs)."""

    input_ids: list[int]
    token_type_ids: list[int] | None
    target: Target | None


@dataclass
class ClassificationStats:
    """What happened to one dataset's records on their way to the model."""

    num_records: int = 0
    num_truncated: int = 0
    num_dropped: int = 0
    lengths: list[int] = field(default_factory=list)
    label_counts: Counter = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        """Plain-dict view for logs and results."""
        return {"records": self.num_records, "examples": len(self.lengths), "truncated": self.num_truncated,
                "dropped_overlong": self.num_dropped, "tokens": sum(self.lengths),
                "max_tokens": max(self.lengths, default=0), "labels": dict(sorted(self.label_counts.items()))}


def tokenize_records(
    records: list[dict[str, Any]], tokenizer: Any, cc: ClassificationConfig, labels: LabelSpace | None, *,
    max_seq_len: int, overlong: str, where: str,
) -> tuple[list[ClassificationExample], ClassificationStats]:
    """Tokenize records (and encode their labels unless ``labels`` is None, for prediction).

    Texts over ``max_seq_len`` tokens are truncated on ``cc.truncation_side`` or, with
    ``overlong='drop'``, dropped. Pairs use the tokenizer's pair template when it has one (BERT:
    ``[CLS] a [SEP] b [SEP]`` with token types), else ``a + "\\n\\n" + b``; truncation of a joined pair
    cuts ``b`` (on ``cc.truncation_side``) before it touches ``a``, as a pair template's would.

    Raises:
        DataError: a record lacks a text (or label) field, or has an invalid label; names the record.
    """
    stats = ClassificationStats(num_records=len(records))
    native_pairs = cc.text_pair_field is not None and _has_pair_template(tokenizer)
    out = []
    for i, record in enumerate(records, start=1):
        here = f"{where} record #{i}"
        text = _text_of(record, cc.text_field, here)
        pair = _text_of(record, cc.text_pair_field, here) if cc.text_pair_field else None
        joined = pair is not None and not native_pairs
        target = labels.encode(_label_of(record, cc, here), here) if labels is not None else None
        encoded = tokenizer(f"{text}\n\n{pair}") if joined else tokenizer(text, pair)
        if len(encoded["input_ids"]) > max_seq_len:
            if overlong == "drop":
                stats.num_dropped += 1
                continue
            stats.num_truncated += 1
            encoded = (_truncated_joined(tokenizer, text, pair, max_seq_len, cc.truncation_side) if joined
                       else _truncated(tokenizer, text, pair, max_seq_len, cc.truncation_side))
        ids = list(encoded["input_ids"])
        types = list(encoded["token_type_ids"]) if "token_type_ids" in encoded else None
        out.append(ClassificationExample(ids, types, target))
        stats.lengths.append(len(ids))
        if labels is not None and labels.problem_type != "regression":
            hot = [target] if isinstance(target, int) else [k for k, v in enumerate(target) if v]
            stats.label_counts.update(labels.names[k] for k in hot)
    return out, stats


@dataclass
class PreparedClassification:
    """Tokenized train/held-out examples, the label space and what happened on the way."""

    train: list[ClassificationExample]
    validation: list[ClassificationExample]
    labels: LabelSpace
    train_stats: ClassificationStats
    validation_stats: ClassificationStats


def prepare_classification_data(config: Config, tokenizer: Any) -> PreparedClassification:
    """Load, split and tokenize the configured classification data.

    The held-out split is ``data.validation`` if set, else a seeded, label-stratified
    ``data.val_fraction`` of train (none if 0).

    Raises:
        ConfigError: data.format or data.columns set (classification reads its own fields).
        DataError: no records, a bad record (named), or nothing left after dropping overlong texts.
    """
    cc, dc = config.classification, config.data
    if dc.format != "auto" or dc.columns:
        raise ConfigError("task=classification reads classification.text_field/text_pair_field/label_field; "
                          "leave data.format and data.columns unset")
    records = _records(dc.train, dc.max_examples)
    labels = build_label_space(cc, records, dc.train.path)
    if dc.validation is not None:
        val_records = _records(dc.validation, dc.max_validation_examples)
    elif dc.val_fraction > 0:
        keep, held = stratified_holdout(_strata(records, cc, labels, dc.train.path), dc.val_fraction,
                                        config.train.seed)
        records, val_records = [records[i] for i in keep], [records[i] for i in held]
    else:
        val_records = []
    kwargs = {"max_seq_len": dc.max_seq_len, "overlong": dc.overlong}
    train, train_stats = tokenize_records(records, tokenizer, cc, labels, where=dc.train.path, **kwargs)
    where_val = dc.validation.path if dc.validation else f"{dc.train.path} (held out)"
    validation, val_stats = tokenize_records(val_records, tokenizer, cc, labels, where=where_val, **kwargs)
    if not train:
        raise DataError(f"no training example left: all {train_stats.num_records} are longer than "
                        f"data.max_seq_len={dc.max_seq_len} (data.overlong=drop)")
    return PreparedClassification(train, validation, labels, train_stats, val_stats)


def _records(source: DataSource, limit: int | None) -> list[dict[str, Any]]:
    records = load_records(source)[:limit] if limit else load_records(source)
    if not records:
        raise DataError(f"{source.path}: no records")
    return records


def _strata(records: list[dict[str, Any]], cc: ClassificationConfig, labels: LabelSpace, where: str) -> list[Any]:
    """Class id per record for single_label (so the held-out split keeps class shares), else one stratum."""
    if cc.problem_type != "single_label":
        return [0] * len(records)
    return [labels.encode(_label_of(r, cc, f"{where} record #{i}"), f"{where} record #{i}")
            for i, r in enumerate(records, start=1)]


def stratified_holdout(keys: list[Any], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (train, held-out) keeping each key's share, deterministically in ``seed``.

    Each key (a class) contributes ``round(fraction · n_key)`` examples (at least 1 when it has
    2 or more), chosen by a seeded shuffle. Both lists are returned in original order.
    """
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(repr(key), []).append(i)
    held = set()
    for key in sorted(groups):
        members = groups[key]
        rng.shuffle(members)
        n = round(fraction * len(members))
        held.update(members[: max(n, 1 if len(members) > 1 and fraction > 0 else 0)])
    return [i for i in range(len(keys)) if i not in held], sorted(held)


def class_weight_vector(spec: str | list[float], examples: list[ClassificationExample],
                        labels: LabelSpace) -> torch.Tensor | None:
    """Per-class weights (K,) float32 from ``classification.class_weights``, or None for 'none'.

    single_label 'balanced': ``n / (K · n_k)`` (scikit-learn's rule; a class absent from train
    gets weight 0). multi_label 'balanced': ``n_neg_k / n_pos_k``, the positive weight of label k.
    'sqrt_balanced': the element-wise square root of 'balanced' (a milder correction that trades less
    majority-class accuracy for minority-class recall).

    Raises:
        DataError: an explicit list whose length is not K.
    """
    if spec == "none":
        return None
    if isinstance(spec, list):
        if len(spec) != labels.num_labels:
            raise DataError(f"classification.class_weights has {len(spec)} entries; there are "
                            f"{labels.num_labels} labels {labels.names}")
        return torch.tensor(spec, dtype=torch.float32)
    n = len(examples)
    if labels.problem_type == "multi_label":
        pos = torch.tensor([e.target for e in examples], dtype=torch.float32).sum(0)
        weights = torch.where(pos > 0, (n - pos) / pos.clamp(min=1), torch.zeros_like(pos))
    else:
        counts = torch.bincount(torch.tensor([e.target for e in examples]), minlength=labels.num_labels).float()
        weights = torch.where(counts > 0, n / (labels.num_labels * counts.clamp(min=1)), torch.zeros_like(counts))
    return weights.sqrt() if spec == "sqrt_balanced" else weights


def collate_classification(examples: list[ClassificationExample], pad_token_id: int,
                           padding_side: str = "right") -> Batch:
    """Pad examples to the longest on ``padding_side`` (see the module docstring for the keys)."""
    longest = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    with_types = examples[0].token_type_ids is not None
    token_type_ids = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        span = slice(0, len(e.input_ids)) if padding_side == "right" else slice(longest - len(e.input_ids), longest)
        input_ids[row, span] = torch.tensor(e.input_ids)
        attention_mask[row, span] = 1
        if with_types:
            token_type_ids[row, span] = torch.tensor(e.token_type_ids)
    batch: Batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                    "num_examples": len(examples), "num_tokens": int(attention_mask.sum())}
    if with_types:
        batch["token_type_ids"] = token_type_ids
    if examples[0].target is not None:
        targets = [e.target for e in examples]
        batch["labels"] = (torch.tensor(targets, dtype=torch.long) if isinstance(targets[0], int)
                           else torch.tensor(targets, dtype=torch.float32))
    return batch


def classification_batch_plan(examples: list[ClassificationExample], *, batch_size: int, shuffle: bool,
                              seed: int, pad_token_id: int) -> BatchPlan:
    """Micro-batches of ``batch_size`` examples; epoch ``e`` is shuffled with seed ``seed + e``."""
    num_micro = -(-len(examples) // batch_size)

    def make_epoch(epoch: int) -> list[Batch]:
        order = list(range(len(examples)))
        if shuffle:
            random.Random(seed + epoch).shuffle(order)
        return [collate_classification([examples[i] for i in order[s : s + batch_size]], pad_token_id)
                for s in range(0, len(order), batch_size)]

    return BatchPlan(micro_batches_per_epoch=num_micro, make_epoch=make_epoch)


def _text_of(record: dict[str, Any], field_name: str, where: str) -> str:
    value = record.get(field_name)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
        raise DataError(f"{where}: text field '{field_name}' must be a non-empty string ({got}; record has "
                        f"{present_fields(record)}); set classification.text_field")
    return value


def _label_of(record: dict[str, Any], cc: ClassificationConfig, where: str) -> Any:
    if record.get(cc.label_field) is None:
        raise DataError(f"{where}: no label field '{cc.label_field}' (record has {present_fields(record)}); "
                        "set classification.label_field")
    return record[cc.label_field]


def _truncated(tokenizer: Any, text: str, pair: str | None, max_seq_len: int, side: str) -> Any:
    previous = tokenizer.truncation_side
    tokenizer.truncation_side = side
    try:
        return tokenizer(text, pair, truncation=True, max_length=max_seq_len)
    finally:
        tokenizer.truncation_side = previous


def _truncated_joined(tokenizer: Any, text: str, pair: str, max_seq_len: int, side: str) -> Any:
    """``text + "\\n\\n" + pair`` in at most ``max_seq_len`` tokens, cutting only ``pair`` (on ``side``).

    A tokenizer without a pair template (decoder LLMs) gets the two texts joined; truncating the
    joined string from the left would cut the *first* text (the question) away before any of the
    second. The pair's tokens are cut instead, and the first text is cut (on ``side``) only when it
    alone does not fit.
    """
    head = f"{text}\n\n"
    budget = max_seq_len - len(tokenizer(head)["input_ids"])
    pair_ids = tokenizer(pair, add_special_tokens=False)["input_ids"]
    while budget > 0:
        kept = pair_ids[-budget:] if side == "left" else pair_ids[:budget]
        encoded = tokenizer(head + tokenizer.decode(kept))
        over = len(encoded["input_ids"]) - max_seq_len
        if over <= 0:
            return encoded
        budget -= over  # re-tokenizing at the join can merge differently: shrink and retry
    return _truncated(tokenizer, head.rstrip(), None, max_seq_len, side)


def _has_pair_template(tokenizer: Any) -> bool:
    """True when encoding a pair adds tokens (separators) beyond the two texts' own encodings."""
    a, b = tokenizer("a")["input_ids"], tokenizer("b")["input_ids"]
    return len(tokenizer("a", "b")["input_ids"]) != len(a) + len(b)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _all_ints(names: Any) -> bool:
    return bool(names) and all(str(n).lstrip("-").isdigit() for n in names)
