"""From a data config to tokenized train/validation examples, with accounting."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from tunelab.config.schema import DataConfig, DataSource
from tunelab.data.formats import detect_format, to_example
from tunelab.data.sources import load_records
from tunelab.data.text_files import is_text_files, load_text_files, split_files
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

    The held-out split is ``cfg.validation`` if set, else a seeded ``val_fraction`` of train; a
    text-file source (folder, glob, ``package:``) is split by file instead (see
    :func:`tunelab.data.text_files.split_files`). Raw-text chunks with the same token ids as an
    earlier chunk are removed (train: earlier train chunks; held-out: any train chunk or earlier
    held-out chunk) and counted in ``DataStats.num_duplicates``.

    Raises:
        DataError: bad records (see :mod:`tunelab.data.formats`), or no training example (or, from
            a ``cfg.validation`` file or a held-out split of files, no held-out example) left after
            filtering; the message names the file and gives the drop counts.
    """
    train_examples, val_examples, fmt = _load_splits(cfg, seed)
    encode = Tokenizer(tokenizer, cfg.max_seq_len, cfg.overlong, cfg.supervise, cfg.chunk_stride)
    seen: set[tuple[int, ...]] = set()
    train, train_stats = tokenize_all(train_examples, encode, seen)
    validation, val_stats = tokenize_all(val_examples, encode, seen)
    if not train:
        raise DataError(
            f"{cfg.train.path}: no training examples left after filtering {train_stats.num_records} records "
            f"(dropped: {dict(train_stats.dropped) or 'none'}); check data.max_seq_len, data.overlong "
            "and data.supervise"
        )
    if val_examples and not validation or cfg.validation is not None and not validation:
        where = cfg.validation.path if cfg.validation is not None else f"{cfg.train.path} (held-out files)"
        raise DataError(f"{where}: no held-out example left after filtering {val_stats.num_records} records "
                        f"(dropped: {dict(val_stats.dropped) or 'none'}, duplicate chunks: {val_stats.num_duplicates})")
    return PreparedData(train, validation, train_stats, val_stats, val_examples, fmt)


def _load_splits(cfg: DataConfig, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Canonical train and held-out examples and the format, before tokenization."""
    if is_text_files(cfg.train.path):
        return _load_file_splits(cfg)
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
    return train_examples, val_examples, fmt


def _load_file_splits(cfg: DataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """A text-file source held out by file; ``max_examples`` keeps the first N training files."""
    if cfg.format not in ("auto", "text"):
        raise DataError(f"data.train '{cfg.train.path}' is a folder/glob of text files (one plain-text document "
                        f"per file); data.format must be 'text' or 'auto', not '{cfg.format}'")
    val_files_spec = cfg.validation.path if cfg.validation is not None and is_text_files(cfg.validation.path) else None
    train_files, val_files = split_files(cfg.train.path, 0.0 if cfg.validation else cfg.val_fraction, val_files_spec)
    train = [to_example(r, "text", {}, r["source"])
             for r in load_text_files(cfg.train.path, train_files[: cfg.max_examples])]
    if cfg.validation is not None and val_files_spec is None:  # held-out data of another kind (a JSONL of text)
        val, _ = load_canonical(cfg.validation, cfg)
    else:
        val = [to_example(r, "text", {}, r["source"]) for r in load_text_files(val_files_spec or cfg.train.path, val_files)]
    return train, val, "text"


def tokenize_all(examples: list[dict[str, Any]], encode: Tokenizer,
                 seen: set[tuple[int, ...]] | None = None) -> tuple[list[TokenizedExample], DataStats]:
    """Tokenize canonical examples, counting drops.

    Args:
        seen: token ids of raw-text chunks kept so far (updated in place); a raw-text chunk already in
            it is removed and counted in ``stats.num_duplicates``. ``None``: no deduplication.
    """
    stats = DataStats(num_records=len(examples))
    out = []
    for example in examples:
        tokenized = encode(example, stats)
        if seen is not None and "text" in example:
            tokenized = _new_chunks(tokenized, seen, stats)
        out.extend(tokenized)
    return out, stats


def _new_chunks(chunks: list[TokenizedExample], seen: set[tuple[int, ...]], stats: DataStats) -> list[TokenizedExample]:
    """The chunks whose ids are not in ``seen`` (then added to it); the others are uncounted from ``stats``."""
    kept = []
    for chunk in chunks:
        key = tuple(chunk.input_ids)
        if key in seen:
            stats.num_duplicates += 1
            stats.num_examples -= 1
            stats.lengths.remove(len(chunk.input_ids))
            stats.num_tokens -= len(chunk.input_ids)
            stats.num_supervised -= chunk.num_supervised
            if chunk.source is not None:
                stats.sources[chunk.source] -= 1
            continue
        seen.add(key)
        kept.append(chunk)
    return kept
