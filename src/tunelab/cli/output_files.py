"""Files that CLI commands write with ``--out``: never replaced unless asked, always written atomically.

``tunelab predict``, ``eval``, ``score`` and ``generate-rejected`` refuse an ``--out`` file that
already exists unless ``--overwrite`` is given (as ``tunelab train`` and ``merge`` do for
directories), and write to a temporary file beside the target that is renamed over it only once
complete, so a failure or Ctrl-C leaves an earlier file intact and no half-written one.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from tunelab.errors import TunelabError

# The ``--overwrite`` option of every command that writes an ``--out`` file.
OverwriteOutOpt = Annotated[bool, typer.Option(help="Replace --out if it exists.")]


def check_new_file(path: Path, overwrite: bool, option: str = "--out") -> None:
    """Refuse ``path`` as an output file if it is a directory, or exists and ``overwrite`` is off.

    Call it before any expensive work, so a refusal costs nothing.

    Raises:
        TunelabError: naming the file and the way out.
    """
    if path.is_dir():
        raise TunelabError(f"{option} {path} is a directory; give a file path")
    if path.exists() and not overwrite:
        raise TunelabError(f"{option} {path} already exists; pass --overwrite to replace it, or choose another file")


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; it replaces ``path`` when the block succeeds.

    The temporary name keeps ``path``'s suffix (plotting libraries pick the format from it) and is
    created by the writer, so it gets the usual permissions. If the block raises, the temporary
    file is removed and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.stem}-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
