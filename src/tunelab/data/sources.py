"""Read raw records from local files, built-in packaged datasets or the hub, through `datasets`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.config.schema import DataSource
from tunelab.errors import DataError

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


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
    if path.suffix in LOCAL_BUILDERS or path.exists():
        return _load_local(path)
    return _load_hub(source)


def _load_local(path: Path) -> list[dict[str, Any]]:
    import datasets

    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    builder = LOCAL_BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use one of {sorted(LOCAL_BUILDERS)}")
    if path.suffix == ".jsonl":
        check_jsonl(path)
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


def check_jsonl(path: Path) -> None:
    """Fail on the first line that is not a JSON object, naming file and line number (1-based)."""
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
