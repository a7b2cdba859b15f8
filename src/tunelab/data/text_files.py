"""Folders and globs of text files as a data source, for continued pre-training on a codebase or documents.

A data source path is a *text-file source* when it is

  * a glob (it contains ``*``, ``?`` or ``[``): ``corpus/**/*.py``, ``docs/*.md``. Python's :mod:`glob`
    with ``recursive=True``: ``**`` matches any number of folders; names starting with ``.`` are not
    matched by ``*`` (hidden files and folders stay out unless the pattern names them);
  * a directory: every file below it, except hidden files and folders and ``__pycache__`` folders;
  * ``package:NAME`` or ``package:NAME/GLOB``: the source tree of the installed Python package
    ``NAME`` (found with :func:`importlib.util.find_spec`, never imported), e.g. ``package:click/**/*.py``.
    The same config works on every machine where the package is installed, wherever it is installed.

Each matched file is one document (record ``{"text": ..., "source": NAME}``; ``source`` is the file
as the user wrote it: the matched path, or ``package:NAME/REL``). Files are read in the order of
their path relative to the *root* (the folder before the first glob character, the directory, or
the package folder), so the data is the same wherever the tree lives.

Held-out split **by file** (:func:`split_files`): with ``data.val_fraction`` the
``max(1, round(val_fraction × files))`` files whose SHA-256 of their relative path (POSIX form,
e.g. ``core.py``, ``sub/mod.py``) is smallest are held out. The split depends only on the relative
paths, not on the seed, the machine or the listing order; a file is never in both splits. With
``data.validation`` a text-file source of its own, files it matches are taken out of train.

Errors (:class:`~tunelab.errors.DataError`, naming the pattern and file): no matching file, a
binary file (a NUL byte in its first 8 KiB, git's test), a file that is not UTF-8 (with the byte
offset), an installed package that does not exist, a split left without a file.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

PACKAGE_PREFIX = "package:"
GLOB_CHARS = "*?["
SKIPPED_DIRS = ("__pycache__",)
BINARY_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class TextFile:
    """One matched file: ``key`` its POSIX path relative to the source's root (what the split hashes),
    ``name`` how messages and ``data inspect`` show it, ``path`` the file itself (resolved)."""

    key: str
    name: str
    path: Path


def is_text_files(spec: str) -> bool:
    """Whether a data source path names text files: ``package:...``, a glob, or an existing directory."""
    return spec.startswith(PACKAGE_PREFIX) or any(c in spec for c in GLOB_CHARS) or Path(spec).is_dir()


def find_text_files(spec: str) -> list[TextFile]:
    """The files ``spec`` matches (see the module docstring), sorted by relative path.

    Raises:
        DataError: no installed package of that name (``package:``), or no file matches.
    """
    root, pattern, shown = _root_and_pattern(spec)
    if pattern is None:
        found = [p for p in root.rglob("*") if p.is_file() and not _skipped(p.relative_to(root))]
    else:
        found = [Path(p) for p in glob.glob(str(root / pattern), recursive=True) if Path(p).is_file()]
    files: dict[str, TextFile] = {}
    seen: set[Path] = set()
    for path in sorted(found, key=lambda p: (len(p.parts), str(p))):  # shortest path first
        real = path.resolve()
        if real in seen:
            continue  # the same file again through a symlink (a symlink loop matched it many times)
        seen.add(real)
        key = path.relative_to(root).as_posix()
        files[key] = TextFile(key, f"{shown}/{key}" if shown else str(path), real)
    if not files:
        raise DataError(f"data source '{spec}' matched no files (looked in {root.resolve()}); check the pattern "
                        "(glob syntax: ** = any folders, e.g. 'corpus/**/*.py')")
    return [files[k] for k in sorted(files)]


def read_text_file(file: TextFile, spec: str) -> str:
    """The UTF-8 text of one matched file (a leading byte-order mark removed).

    Raises:
        DataError: the file is binary (a NUL byte in its first 8 KiB) or not UTF-8 (the byte offset named).
    """
    data = file.path.read_bytes()
    nul = data.find(b"\0", 0, BINARY_SNIFF_BYTES)
    if nul >= 0:
        raise DataError(f"{file.name}: binary file (NUL byte at byte {nul}), matched by data source '{spec}'; "
                        "narrow the pattern to text files, e.g. '**/*.py'")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise DataError(f"{file.name}: not UTF-8 text ({err.reason} at byte {err.start}), matched by data source "
                        f"'{spec}'; convert it to UTF-8 or narrow the pattern") from None


def load_text_files(spec: str, files: list[TextFile] | None = None) -> list[dict[str, Any]]:
    """One record ``{"text": file text, "source": file name}`` per file of ``spec`` (or of ``files``)."""
    return [{"text": read_text_file(f, spec), "source": f.name} for f in (find_text_files(spec) if files is None else files)]


def held_out_order(key: str) -> bytes:
    """Sort key of a file for the held-out split: SHA-256 of its relative path (POSIX, UTF-8)."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def split_files(train_spec: str, val_fraction: float, val_spec: str | None = None) -> tuple[list[TextFile], list[TextFile]]:
    """Train and held-out files, split by file (see the module docstring); each list sorted by relative path.

    Args:
        val_spec: a text-file source for the held-out split; its files are taken out of train.
            ``None``: ``val_fraction`` of the train files is held out (0 = none).

    Raises:
        DataError: no file matches; one file only (nothing left to hold out); every train file is
            also a held-out file.
    """
    files = find_text_files(train_spec)
    if val_spec is not None:
        held = find_text_files(val_spec)
        held_paths = {f.path for f in held}
        train = [f for f in files if f.path not in held_paths]
        if not train:
            raise DataError(f"data.train '{train_spec}': every one of its {len(files)} file(s) is also matched by "
                            f"data.validation '{val_spec}', so no training file is left")
        return train, held
    if val_fraction <= 0:
        return files, []
    if len(files) < 2:
        raise DataError(f"data.train '{train_spec}' matched {len(files)} file and data.val_fraction={val_fraction} "
                        "holds out whole files: the held-out or the training split would be empty; add files or "
                        "give data.validation")
    num_held = min(len(files) - 1, max(1, round(val_fraction * len(files))))
    held_keys = {f.key for f in sorted(files, key=lambda f: held_out_order(f.key))[:num_held]}
    return [f for f in files if f.key not in held_keys], [f for f in files if f.key in held_keys]


def _root_and_pattern(spec: str) -> tuple[Path, str | None, str | None]:
    """(root folder, glob below it or None for 'every file', prefix for shown names or None)."""
    shown = None
    if spec.startswith(PACKAGE_PREFIX):
        name, _, rest = spec.removeprefix(PACKAGE_PREFIX).partition("/")
        root, shown, spec_rest = _package_root(name, spec), f"{PACKAGE_PREFIX}{name}", rest
        return root, spec_rest or None, shown
    parts = Path(spec).parts
    first_glob = next((i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS)), None)
    if first_glob is None:
        return Path(spec), None, None
    return Path(*parts[:first_glob]) if first_glob else Path("."), str(Path(*parts[first_glob:])), None


def _package_root(name: str, spec: str) -> Path:
    try:
        found = importlib.util.find_spec(name) if name else None
    except (ImportError, ValueError):  # a dotted name whose parent is missing
        found = None
    if found is None or not found.submodule_search_locations:
        kind = "a single module, not a package" if found is not None else "not installed"
        raise DataError(f"data source '{spec}': Python package '{name}' is {kind}; write package:NAME/GLOB with an "
                        "installed package's import name (e.g. package:click/**/*.py) and pip install it")
    return Path(list(found.submodule_search_locations)[0])


def _skipped(rel: Path) -> bool:
    return any(part.startswith(".") or part in SKIPPED_DIRS for part in rel.parts)
