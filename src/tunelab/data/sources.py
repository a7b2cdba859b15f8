"""Read raw records from local files, folders and globs of text files, built-in packaged datasets or the hub.

JSON and JSON-lines files are parsed here with :mod:`json`, so every record keeps exactly the
fields it has in the file (``datasets`` would merge all records' keys into one schema and fill the
absent ones with None). CSV and Parquet files and hub datasets go through ``datasets``; being
columnar, their records carry every column, with None where a record has no value.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from tunelab.config.schema import DataSource
from tunelab.data.text_files import is_text_files, load_text_files
from tunelab.errors import DataError

LOCAL_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")
EXPECTED_LAYOUT = {  # what a file of each type must hold, for error messages
    ".jsonl": "expected one JSON object per line",
    ".json": "expected a JSON array of objects, or one JSON object per line",
    ".csv": "expected a header line naming the columns, then one line per record",
    ".parquet": "expected at least one row",
}


def load_records(source: DataSource) -> list[dict[str, Any]]:
    """All records of one data source as plain dicts, in file order.

    A UTF-8 byte-order mark at the start of a JSON, JSON-lines or CSV file is accepted.

    A directory, a glob or ``package:NAME[/GLOB]`` is a folder of text files, one record
    ``{"text", "source"}`` per file (see :mod:`tunelab.data.text_files`).

    Raises:
        DataError: missing file, unsupported extension, an empty file, malformed JSON or CSV
            (naming the file and line number), or a hub dataset that cannot be loaded.
    """
    if is_text_files(source.path):
        return load_text_files(source.path)
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


def _one_file_glob(path: Path) -> str:
    """A glob matching only ``path`` (its last character as a one-letter class: 'a.py' -> 'a.p[y]')."""
    text = str(path)
    return f"{text[:-1]}[{text[-1]}]" if text else text


def _load_local(path: Path) -> list[dict[str, Any]]:
    """Records of a local file; an empty file (no records) is an error naming the file."""
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a data file; give one {'/'.join(LOCAL_SUFFIXES)} file "
                        "(several files: one data source each, e.g. data.train and data.validation)")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {list(LOCAL_SUFFIXES)}, or, to "
                        f"train on the raw text of source or text files, a folder or a glob that matches them "
                        f"(e.g. '{path.parent / ('*' + path.suffix)}'; one file: '{_one_file_glob(path)}')")
    try:
        if path.suffix == ".jsonl":
            records = read_jsonl(path)
        elif path.suffix == ".json":
            records = read_json(path)
        elif path.suffix == ".csv":
            records = _read_csv(path)
        else:
            records = _read_parquet(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not records:
        raise DataError(f"{path}: the file has no records; {EXPECTED_LAYOUT[path.suffix]}")
    return records


def _read_csv(path: Path) -> list[dict[str, Any]]:
    """Records of a CSV file (through ``datasets``, which types numbers), after :func:`check_csv`."""
    if check_csv(path) == 0:
        return []
    return _load_columnar(path, "csv")


def check_csv(path: Path) -> int:
    """Check every row has as many fields as the header; returns the number of data rows.

    Blank lines are skipped, as the reader does.

    Raises:
        DataError: the first row whose field count differs from the header's, naming file and line.
    """
    header: list[str] | None = None
    num_rows = 0
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            for row in reader:
                if not row:
                    continue
                if header is None:
                    header, header_line = row, reader.line_num
                    continue
                if len(row) != len(header):
                    raise DataError(
                        f"{path}:{reader.line_num}: malformed CSV: {len(row)} field(s) where the header (line "
                        f"{header_line}) has {len(header)} {header}; quote values that contain commas, and "
                        "close every quote"
                    )
                num_rows += 1
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    return num_rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        num_rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for files that are not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    return _load_columnar(path, "parquet") if num_rows else []


def _load_columnar(path: Path, builder: str) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:  # datasets wraps parser errors in several exception types
        raise DataError(f"{path}: cannot read as {builder}: {_root_cause(err)}") from None
    return ds.to_list()


def _root_cause(err: BaseException) -> str:
    """The innermost error's message (datasets wraps parser errors as 'An error occurred ...')."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {err}"


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
    with path.open(encoding="utf-8-sig") as f:  # a leading UTF-8 BOM is accepted, as for CSV
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
    text = path.read_text(encoding="utf-8-sig")  # a leading UTF-8 BOM is accepted, as for CSV
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON lines in a .json file
            return read_jsonl(path)
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno}); "
                        f"{EXPECTED_LAYOUT['.json']}") from None
    if isinstance(data, dict):
        return [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: holds a single JSON {type(data).__name__} ({json.dumps(data)[:40]}); "
                        f"{EXPECTED_LAYOUT['.json']}")
    for i, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            raise DataError(f"{path}: array element #{i} is not a JSON object: {json.dumps(item)[:40]}")
    return data
