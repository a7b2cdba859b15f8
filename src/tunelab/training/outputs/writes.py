"""Atomic writes, directory markers and disk-error messages (part of :mod:`tunelab.training.outputs`).

Files and directories are written under a temporary name beside the target and renamed into place
when complete; :func:`writing` turns an OS error while writing (full disk, read-only filesystem, no
permission) into one :class:`~tunelab.errors.OutputError` naming the path and the cause.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunelab import __version__
from tunelab.errors import OutputError, TunelabError

MARKER = ".tunelab-output.json"
LOCK = ".tunelab.lock"
LOCK_INFO = ".tunelab.lock.json"
# Files tunelab keeps in an output directory for itself: they never make a directory "hold" anything.
LINEAGE_START = ".tunelab-lineage-start.json"  # the earlier run a chained run started from (models/lineage.py)
BOOKKEEPING = frozenset({MARKER, LOCK, LOCK_INFO, LINEAGE_START})
BOOKKEEPING_TMP = ".tmp-.tunelab"  # prefix of a bookkeeping file being written (a race's loser may see it)
# OS errors caused by the environment (disk, filesystem, permissions), reported without a traceback.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                                errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EFBIG, errno.ETXTBSY})


def atomic_dir(target: Path) -> Path:
    """A fresh temp directory next to ``target``; pair with :func:`commit_dir`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))


def commit_dir(tmp: Path, target: Path) -> None:
    """Move a finished temp directory into place, replacing an older ``target`` only at the end."""
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextmanager
def atomic_output_dir(target: Path, kind: str) -> Iterator[Path]:
    """Yield a temporary directory to fill; it replaces ``target`` (with a :data:`MARKER`) on success.

    Check ``target`` with :func:`check_out_dir` first. If the block raises, the temporary directory
    is removed and ``target`` is left as it was; an OS error (full disk, ...) becomes an
    :class:`OutputError` naming ``target``.
    """
    target = target.resolve()
    with writing(target):
        tmp = atomic_dir(target)
        try:
            yield tmp
            write_marker(tmp, kind, files=sorted(p.name for p in tmp.iterdir()))
            commit_dir(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; it replaces ``path`` when the block succeeds.

    The temporary name keeps ``path``'s suffix (plotting libraries pick the format from it) and is
    created by the writer, so it gets the usual permissions. If the block raises, the temporary
    file is removed and ``path`` is left as it was; an OS error (full disk, ...) becomes an
    :class:`OutputError` naming ``path``.
    """
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.stem}-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_marker(directory: Path, kind: str, files: Sequence[str] | None = None) -> None:
    """Write :data:`MARKER` into ``directory``: it was written by tunelab, as ``kind``."""
    info: dict[str, Any] = {"kind": kind, "tunelab_version": __version__,
                            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if files is not None:
        info["files"] = [name for name in files if name not in BOOKKEEPING]
    tmp = directory / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, directory / MARKER)


def read_marker(directory: Path) -> dict[str, Any] | None:
    """The :data:`MARKER` record of ``directory``, or None if it has none (or an unreadable one)."""
    try:
        info = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


@contextmanager
def writing(what: Path | str, root: Path | None = None) -> Iterator[None]:
    """Turn an environment failure while writing ``what`` into one :class:`OutputError`.

    ``what`` is named relative to ``root`` when given ("no space left on device while writing
    checkpoints/step-000040 in /runs/a"). The cause is the OS error in the exception (or its
    chain), an OS error message inside a library's exception (safetensors, torch), or else what a
    probe write into the directory reports; any other exception passes through unchanged.
    """
    try:
        yield
    except TunelabError:
        raise
    except Exception as err:
        path = Path(root, what) if root is not None else Path(what)
        cause, filename = _environment_cause(err, path)
        if cause is None:
            raise
        if filename is not None and not _is_within(Path(filename), path) and not _in_temp_of(Path(filename), path):
            raise OutputError(f"{cause}: {filename}") from err  # e.g. an unreadable input file
        if root is not None:
            name = f"{what} in {root}"
        elif filename is not None and Path(filename).absolute() != path.absolute():
            name = f"{Path(filename).absolute().relative_to(path.absolute())} in {path}"
        else:
            name = str(what)
        hint = "; free some space and retry" if "space" in cause or "quota" in cause else ""
        raise OutputError(f"{cause} while writing {name} (files written before it are intact{hint})") from err


@contextmanager
def writing_checkpoint(output_dir: Path, step: int) -> Iterator[None]:
    """:func:`writing` for the checkpoint of ``step``, after checking there is room for it.

    A checkpoint is about as large as the newest one already written; when the filesystem has
    less free space than that, the write is refused before it starts (nothing is half written),
    naming both sizes. Without an earlier checkpoint the write is tried, and a failure is reported
    by :func:`writing`.

    Raises:
        OutputError: "no space left on device while writing checkpoints/step-000040 in RUN: ...".
    """
    from tunelab.training.checkpoint import list_checkpoints

    name = f"checkpoints/step-{step:06d}"
    existing = list_checkpoints(output_dir)
    if existing:
        need = sum(p.stat().st_size for p in existing[-1].rglob("*") if p.is_file())
        free = shutil.disk_usage(existing[-1]).free
        if free < need:
            raise OutputError(f"no space left on device while writing {name} in {output_dir}: it needs about "
                              f"{_size(need)} (the size of {existing[-1].name}) and {_size(free)} are free; free some "
                              f"space and --resume (checkpoints up to {existing[-1].name} are intact)")
    with writing(name, output_dir):
        yield


def _size(num_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"


def _environment_cause(err: BaseException, path: Path) -> tuple[str | None, str | None]:
    """(cause, the file the OS error names or None) when ``err`` comes from the environment, else (None, None)."""
    chain: list[BaseException] = []
    item: BaseException | None = err
    while item is not None and item not in chain:
        chain.append(item)
        item = item.__cause__ or item.__context__
    for item in chain:
        if isinstance(item, OSError) and item.errno in ENVIRONMENT_ERRNOS:
            return describe_os_error(item), (str(item.filename) if item.filename else None)
    text = " ".join(str(item) for item in chain).lower()
    for number in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # libraries that wrap the OS error in text
        if os.strerror(number).lower() in text:
            return os.strerror(number).lower(), None
    probe = probe_write(nearest_existing(path if path.is_dir() else path.parent))
    if probe is not None:
        return describe_os_error(probe), None
    if "pytorchstreamwriter" in text or "inline_container" in text or "file write failed" in text:
        free = shutil.disk_usage(nearest_existing(path)).free  # torch's writer drops the OS error
        return f"a write failed (most likely no space left on device; {_size(free)} free now)", None
    return None, None


def _in_temp_of(path: Path, target: Path) -> bool:
    """Whether ``path`` is inside the ``.tmp-<name>-*`` sibling that :func:`atomic_dir` makes for ``target``."""
    path, target = path.absolute(), target.absolute()
    return any(p.parent == target.parent and p.name.startswith(f".tmp-{target.name}-") for p in (path, *path.parents))


def _is_within(path: Path, root: Path) -> bool:
    path, root = path.absolute(), root.absolute()
    return path == root or root in path.parents


def probe_write(directory: Path) -> OSError | None:
    """Write, flush and remove 64 KiB in ``directory``; the OS error that stopped it, or None."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".tunelab-probe-")
    except OSError as err:
        return err
    try:
        os.write(fd, b"\0" * 65536)
        os.fsync(fd)
    except OSError as err:
        return err
    finally:
        os.close(fd)
        Path(name).unlink(missing_ok=True)
    return None


def describe_os_error(err: OSError) -> str:
    return (err.strerror or os.strerror(err.errno or 0) or str(err)).lower()


def environment_error_message(err: OSError) -> str | None:
    """One line for an OS error caused by the environment ("permission denied reading X"), else None."""
    if err.errno not in ENVIRONMENT_ERRNOS:
        return None
    return f"{describe_os_error(err)}: {err.filename}" if err.filename else describe_os_error(err)


def nearest_existing(path: Path) -> Path:
    for item in (path, *path.absolute().parents):
        if item.exists():
            return item
    return Path("/")
