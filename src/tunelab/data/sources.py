"""Read raw records from local files, built-in packaged datasets or the hub.

JSON and JSON-lines files are parsed here with :mod:`json`, so every record keeps exactly the
fields it has in the file (``datasets`` would merge all records' keys into one schema and fill the
absent ones with None). CSV and Parquet files and hub datasets go through ``datasets``; being
columnar, their records carry every column, with None where a record has no value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.config.schema import DataSource
from tunelab.errors import DataError

LOCAL_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")


def load_records(source: DataSource) -> list[dict[str, Any]]:
    """All records of one data source as plain dicts, in file order.

    Raises:
        DataError: missing file, unsupported extension, a malformed JSON line (naming the file and
            line number), or a hub dataset that cannot be loaded.
    """
    if source.path.startswith("builtin:"):
        from tunelab.data.builtin import load_builtin

        return load_builtin(source.path.removeprefix("builtin:"), source.name, source.split)
    path = Path(source.path)
    if path.suffix in LOCAL_SUFFIXES or path.exists():
        return _load_local(path)
    return _load_hub(source)


def present_fields(record: dict[str, Any]) -> list[str]:
    """The record's field names that hold a value (not None), sorted, for error messages.

    Columnar sources (CSV, Parquet, hub datasets) give every record every column, with None where
    the record has nothing; listing those would name fields the record does not have.
    """
    return sorted(key for key, value in record.items() if value is not None)


def _load_local(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {list(LOCAL_SUFFIXES)}")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".json":
        return read_json(path)
    return _load_columnar(path, path.suffix.removeprefix("."))


def _load_columnar(path: Path, builder: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parser errors in several exception types
        raise DataError(f"{path}: cannot read as {builder}: {err}") from None
    return ds.to_list()


def _load_hub(source: DataSource) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(source.path, source.name, split=source.split)
    except Exception as err:
        raise DataError(
            f"cannot load dataset '{source.path}' (not a local file; tried the hub): {err}"
        ) from None
    return ds.to_list()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON object on each non-blank line, in order.

    Raises:
        DataError: the first line that is not a JSON object, naming file and line number (1-based).
    """
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
            records.append(obj)
    return records


def read_json(path: Path) -> list[dict[str, Any]]:
    """Records of a ``.json`` file: a JSON array of objects, one object, or JSON lines.

    Raises:
        DataError: malformed JSON (file and line), a top-level value that is neither an array nor an
            object, or an array element that is not an object.
    """
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON lines in a .json file
            return read_jsonl(path)
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from None
    if isinstance(data, dict):
        return [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: holds a JSON {type(data).__name__}; expected an array of objects or JSON lines")
    for i, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{path}: array element #{i} is a {type(item).__name__}; expected a JSON object")
    return data
