"""From a data config to tokenized train/validation examples, with accounting."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from tunelab.config.schema import DataConfig, DataSource
from tunelab.data.formats import detect_format, to_example
from tunelab.data.sources import load_records
from tunelab.data.tokenize import DataStats, TokenizedExample, Tokenizer
from tunelab.errors import DataError


@dataclass
class PreparedData:
    """Canonical and tokenized examples of both splits, with what was dropped and why."""

    train: list[TokenizedExample]
    validation: list[TokenizedExample]
    train_stats: DataStats
    validation_stats: DataStats
    validation_examples: list[dict[str, Any]]
    format: str


def load_canonical(source: DataSource, cfg: DataConfig, limit: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """Records of ``source`` converted to canonical examples; returns them and the format used."""
    records = load_records(source)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise DataError(f"{source.path} (split {source.split!r}, name {source.name!r}): no records")
    fmt = cfg.format if cfg.format != "auto" else detect_format(records[0], cfg.columns, where=f"{source.path} record #1")
    examples = []
    for i, record in enumerate(records, start=1):
        examples.append(to_example(record, fmt, cfg.columns, where=f"{source.path} record #{i}"))
    return examples, fmt


def prepare_data(cfg: DataConfig, tokenizer: Any, seed: int) -> PreparedData:
    """Load, convert, split and tokenize the configured data.

    The held-out split is ``cfg.validation`` if set, else a seeded ``val_fraction`` of train.

    Raises:
        DataError: bad records (see :mod:`tunelab.data.formats`), or no training example (or, from
            a ``cfg.validation`` file, no held-out example) left after filtering; the message names
            the file and gives the drop counts.
    """
    train_examples, fmt = load_canonical(cfg.train, cfg, cfg.max_examples)
    if cfg.validation is not None:
        val_examples, _ = load_canonical(cfg.validation, cfg, cfg.max_validation_examples)
    elif cfg.val_fraction > 0:
        order = list(range(len(train_examples)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(cfg.val_fraction * len(order)))
        held = set(order[:n_val])
        val_examples = [e for i, e in enumerate(train_examples) if i in held]
        train_examples = [e for i, e in enumerate(train_examples) if i not in held]
    else:
        val_examples = []
    encode = Tokenizer(tokenizer, cfg.max_seq_len, cfg.overlong, cfg.supervise)
    train, train_stats = tokenize_all(train_examples, encode)
    validation, val_stats = tokenize_all(val_examples, encode)
    if not train:
        raise DataError(
            f"{cfg.train.path}: no training examples left after filtering {train_stats.num_records} records "
            f"(dropped: {dict(train_stats.dropped) or 'none'}); check data.max_seq_len, data.overlong "
            "and data.supervise"
        )
    if cfg.validation is not None and not validation:
        raise DataError(f"{cfg.validation.path}: no held-out example left after filtering {val_stats.num_records} "
                        f"records (dropped: {dict(val_stats.dropped) or 'none'})")
    return PreparedData(train, validation, train_stats, val_stats, val_examples, fmt)


def tokenize_all(examples: list[dict[str, Any]], encode: Tokenizer) -> tuple[list[TokenizedExample], DataStats]:
    """Tokenize canonical examples, counting drops."""
    stats = DataStats(num_records=len(examples))
    out = []
    for example in examples:
        out.extend(encode(example, stats))
    return out, stats
