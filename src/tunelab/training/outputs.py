"""One place that writes: output-path checks, atomic writes and the run lock.

Every command that writes calls this module: ``tunelab train`` (every recipe) for its
``output_dir``, ``merge`` and ``export`` for their ``--out`` directory, ``predict``, ``eval``,
``score`` and ``generate-rejected`` for their ``--out`` file. The rules:

* **Markers.** Every directory tunelab creates holds :data:`MARKER` (``.tunelab-output.json``):
  its kind (``run``, ``merged``, ``export``) and, for a model directory, the names of the files
  written into it. A run directory from before markers is recognised by :data:`RUN_MARKERS`.
* **--overwrite replaces only tunelab's own output.** ``train --overwrite`` replaces a run;
  ``merge``/``export --overwrite`` replace a directory whose marker says ``merged`` or ``export``
  and that holds nothing but the files listed there. Never an input of the command (the run being
  merged), a directory holding an input, the working directory or a parent of it. An ``--out``
  file is replaced only with ``--overwrite``, and never when it is an input or inside an input
  directory.
* **One process per output directory.** ``train`` holds an OS advisory lock (``filelock``, i.e.
  ``flock(2)``, released by the kernel when the process ends, ``kill -9`` included) on
  ``<output_dir>/.tunelab.lock`` for the whole run; ``.tunelab.lock.json`` names the holder (pid,
  host, start time, command). A second ``train``, a ``--resume`` of a live run, or a
  ``merge``/``export``/``predict --out`` into a locked directory is refused naming the holder.
* **Atomic writes.** Files and directories are written under a temporary name beside the target
  and renamed into place when complete; an OS error while writing (full disk, read-only
  filesystem, no permission) becomes one :class:`~tunelab.errors.OutputError` naming the path and
  the cause, and what was there before is left as it was.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunelab import __version__
from tunelab.errors import OutputError, TunelabError

MARKER = ".tunelab-output.json"
LOCK = ".tunelab.lock"
LOCK_INFO = ".tunelab.lock.json"
# Files tunelab keeps in an output directory for itself: they never make a directory "hold" anything.
BOOKKEEPING = frozenset({MARKER, LOCK, LOCK_INFO})
# Names only a tunelab run writes into its output_dir; any of them marks an (old or interrupted) run.
BEFORE_TRAINING = "before_training.json"
RUN_MARKERS = ("tunelab.json", "checkpoints", "metrics.jsonl", "reference_logps", BEFORE_TRAINING)
# Kinds of directory that merge/export --overwrite may replace.
MODEL_KINDS = ("merged", "export")
# OS errors caused by the environment (disk, filesystem, permissions), reported without a traceback.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                                errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EFBIG, errno.ETXTBSY})


# ----------------------------------------------------------------------------------------------- checks


def check_output_dir(output_dir: Path, resume: bool | str | None, overwrite: bool) -> Path | None:
    """``train``'s check of its ``output_dir``; returns the checkpoint to resume from, if any.

    With ``overwrite`` nothing is deleted here: the replaced run's checkpoints are removed by
    :func:`tunelab.training.loop.fit` just before the first step, after data and model loading
    succeeded, so an ``--overwrite`` that fails on bad input leaves the old run resumable.

    Raises:
        OutputError: the directory holds a run (finished or interrupted: checkpoints, metrics,
            before-training results) and neither resume nor overwrite was asked for; it is a
            file; it is not empty and holds no tunelab run (never written into, even with
            ``overwrite``).
        TunelabError: resume was asked for and there is no intact checkpoint to resume from.
    """
    if resume:
        return resume_target(output_dir, resume)
    if _dir_kind(output_dir) == "run" and not overwrite:
        raise OutputError(_existing_run_message(output_dir))
    return None


def resume_target(output_dir: Path, resume: bool | str) -> Path:
    """The checkpoint ``--resume`` (``True``/``"latest"``) or ``--resume-from PATH`` continues from:
    the newest intact one (a damaged newer one is named and skipped, leftovers of killed writes are
    cleaned up; see :mod:`tunelab.training.resume`), or ``PATH`` once its manifest checks out.

    Raises:
        TunelabError: ``PATH`` is not a checkpoint directory or is damaged, or ``output_dir`` has no
            intact checkpoint.
    """
    from tunelab.training.resume import resume_checkpoint, verified_checkpoint

    if isinstance(resume, str) and resume not in ("latest", "true"):
        return verified_checkpoint(Path(resume))
    return resume_checkpoint(output_dir)


def refuse_foreign_dir(output_dir: Path) -> None:
    """Refuse an ``output_dir`` that is a file, or a non-empty directory that no tunelab run wrote.

    A run writes model, tokenizer and report files under fixed names, which would silently replace
    a user's files of the same name; tunelab never deletes user files, so it asks for another
    directory instead, ``--overwrite`` or not.

    Raises:
        OutputError: naming the directory, what it holds and a directory to use instead.
    """
    _dir_kind(output_dir)


def _dir_kind(output_dir: Path) -> str | None:
    """``None`` for a missing or empty directory, ``"run"`` for a run's; other contents are refused."""
    _refuse_file_in_path(output_dir, "output_dir")
    if not output_dir.exists():
        return None
    entries = _entries(output_dir)
    if not entries:
        return None
    kind = (read_marker(output_dir) or {}).get("kind")
    if kind == "run" or (kind is None and any(name in RUN_MARKERS for name in entries)):
        return "run"
    what = f"a tunelab {kind} model" if kind else "not a tunelab run"
    raise OutputError(
        f"output_dir {output_dir} is not empty and is {what} (it holds {_shown(entries)}); a run would "
        "write its model and report files among them, so tunelab refuses (--overwrite only replaces "
        f"earlier tunelab runs). Set output_dir to a new or empty directory, e.g. output_dir={output_dir / 'run'}"
    )


def _existing_run_message(output_dir: Path) -> str:
    from tunelab.training.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(output_dir)
    if (output_dir / "tunelab.json").exists():
        state = "a finished run"
    else:
        state = "an interrupted run (no tunelab.json yet"
        state += f"; latest checkpoint {checkpoints[-1].name})" if checkpoints else "; no checkpoint)"
    how = "pass --resume to continue it, " if checkpoints else ""
    return (f"{output_dir} already holds {state}; {how}pass --overwrite to replace it, or choose another "
            "output_dir")


def check_out_dir(out: Path, *, overwrite: bool, inputs: Sequence[Path | str] = (), option: str = "--out",
                  kinds: Sequence[str] = MODEL_KINDS) -> None:
    """Check a directory a command is about to write as a whole (``merge``, ``export``).

    Call it before any expensive work. ``out`` may be new or empty; with ``overwrite`` it may also
    be an earlier tunelab output of one of ``kinds`` (by its :data:`MARKER`) holding only the files
    listed in that marker. It is then replaced only once the new directory is complete (see
    :func:`atomic_output_dir`).

    Args:
        inputs: paths the command reads (the run being merged): ``out`` may not be one of them,
            nor contain one.

    Raises:
        OutputError: ``out`` is a file or below a file; it is an input, holds an input, or is the
            working directory or a parent of it; it is locked by a live run; it is not empty and
            ``overwrite`` is off; it holds files tunelab did not write there; it cannot be written.
    """
    _refuse_file_in_path(out, option)
    refuse_if_locked(out, f"{option} {out}")
    _refuse_inputs(out, inputs, option)
    if out.is_dir() and (entries := _entries(out)):
        marker = read_marker(out) or {}
        if marker.get("kind") not in kinds:
            what = f"a tunelab {marker['kind']} directory" if marker.get("kind") else "not written by tunelab"
            raise OutputError(
                f"{option} {out} is not empty and is {what} (it holds {_shown(entries)}); tunelab never deletes "
                f"it, --overwrite or not (--overwrite only replaces an earlier {' or '.join(kinds)} output). "
                f"Choose a new or empty directory, e.g. {option} {out / 'merged'}")
        extra = sorted(set(entries) - set(marker.get("files", ())))
        if extra:
            raise OutputError(
                f"{option} {out} holds files tunelab did not write there ({_shown(extra)}); tunelab never deletes "
                "them, --overwrite or not. Move them away or choose another directory")
        if not overwrite:
            raise OutputError(f"{option} {out} holds an earlier tunelab {marker['kind']} output; pass --overwrite "
                              "to replace it, or choose another directory")
    check_writable(out, option)


def check_out_file(path: Path, *, overwrite: bool, inputs: Sequence[Path | str] = (), option: str = "--out") -> None:
    """Check a file a command is about to write (``predict``, ``eval``, ``score``, ``generate-rejected``).

    Call it before any expensive work, so a refusal costs nothing.

    Raises:
        OutputError: ``path`` is a directory or below a file; it exists and ``overwrite`` is off;
            it is one of ``inputs`` or inside an input directory (``--overwrite`` or not); it lies
            in a directory a live run holds; its directory cannot be written.
    """
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory; give a file path")
    _refuse_file_in_path(path.parent, f"{option} {path}: its directory")
    refuse_if_locked(path.parent, f"{option} {path}")
    if path.exists():
        if not overwrite:
            raise OutputError(f"{option} {path} already exists; pass --overwrite to replace it, or choose another file")
        for item in _existing(inputs):
            if path.resolve() == item or item in path.resolve().parents:
                raise OutputError(f"{option} {path} is {'' if path.resolve() == item else 'inside '}{item}, which "
                                  "this command reads; tunelab does not replace its own input. Choose another file")
    check_writable(path.parent, option)


def check_writable(path: Path, what: str = "output_dir") -> None:
    """Refuse ``path`` (a directory, existing or to be created) early if nothing can be written there.

    Writes and removes a small probe file in ``path`` or, when it does not exist yet, in its nearest
    existing parent, so a read-only filesystem, a missing permission or a full disk is found before
    minutes of data and model loading.

    Raises:
        OutputError: naming the directory and the cause (e.g. "read-only file system").
    """
    _refuse_file_in_path(path, what)
    where = _nearest_existing(path)
    err = _probe_write(where)
    if err is not None:
        raise OutputError(f"cannot write {what} {path}: {_cause(err)} (in {where})")


def refuse_if_locked(path: Path, action: str) -> None:
    """Refuse to write ``path`` while it lies in (or is) a directory a live ``train`` holds.

    Raises:
        OutputError: naming the holder's pid, host, command and start time.
    """
    from filelock import FileLock, Timeout

    for directory in (path, *path.absolute().parents):
        lock_path = directory / LOCK
        if not lock_path.is_file():
            continue
        lock = FileLock(lock_path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise OutputError(f"{action}: {_holder_message(directory)}") from None
        except OSError:
            continue  # a lock file we cannot open (read-only): no process can hold it for writing here
        lock.release()


def _refuse_inputs(out: Path, inputs: Sequence[Path | str], option: str) -> None:
    target = out.resolve()
    for item in _existing(inputs):
        if target == item or target in item.parents:
            raise OutputError(f"{option} {out} {'is' if target == item else 'holds'} {item}, which this command "
                              "reads; tunelab never replaces its own input. Choose another directory")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputError(f"{option} {out} is the working directory{'' if target == cwd else ' or a parent of it'}; "
                          f"tunelab never replaces it. Choose a new directory, e.g. {option} {out / 'merged'}")


def _refuse_file_in_path(path: Path, what: str) -> None:
    """Refuse ``path`` when it, or a parent of it, is an existing file (not a directory)."""
    for item in (path, *path.parents):
        if item.exists() or item.is_symlink():
            if not item.is_dir():
                where = "is a file" if item == path else f"lies below {item}, which is a file"
                raise OutputError(f"{what} {path} {where}, not a directory; choose another path")
            return


# ----------------------------------------------------------------------------------------------- writes


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
            return _cause(item), (str(item.filename) if item.filename else None)
    text = " ".join(str(item) for item in chain).lower()
    for number in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # libraries that wrap the OS error in text
        if os.strerror(number).lower() in text:
            return os.strerror(number).lower(), None
    probe = _probe_write(_nearest_existing(path if path.is_dir() else path.parent))
    if probe is not None:
        return _cause(probe), None
    if "pytorchstreamwriter" in text or "inline_container" in text or "file write failed" in text:
        free = shutil.disk_usage(_nearest_existing(path)).free  # torch's writer drops the OS error
        return f"a write failed (most likely no space left on device; {_size(free)} free now)", None
    return None, None


def _in_temp_of(path: Path, target: Path) -> bool:
    """Whether ``path`` is inside the ``.tmp-<name>-*`` sibling that :func:`atomic_dir` makes for ``target``."""
    path, target = path.absolute(), target.absolute()
    return any(p.parent == target.parent and p.name.startswith(f".tmp-{target.name}-") for p in (path, *path.parents))


def _is_within(path: Path, root: Path) -> bool:
    path, root = path.absolute(), root.absolute()
    return path == root or root in path.parents


def _probe_write(directory: Path) -> OSError | None:
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


def _cause(err: OSError) -> str:
    return (err.strerror or os.strerror(err.errno or 0) or str(err)).lower()


def environment_error_message(err: OSError) -> str | None:
    """One line for an OS error caused by the environment ("permission denied reading X"), else None."""
    if err.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = f" ({err.filename})" if err.filename else ""
    return f"{_cause(err)}{where}"


# ----------------------------------------------------------------------------------------------- lock


@contextmanager
def run_lock(directory: Path, command: str = "train") -> Iterator[None]:
    """Hold ``directory``'s run lock while the block runs; refuse if another process holds it.

    The lock is ``flock(2)`` on ``directory/.tunelab.lock`` through ``filelock``: the kernel releases
    it when this process ends in any way, so a killed run never leaves a stale lock. The holder is
    written to ``.tunelab.lock.json`` (pid, host, start time, command) for the refusal message.

    Raises:
        OutputError: another process holds the lock (naming it), or ``directory`` cannot be created.
    """
    from filelock import FileLock, Timeout

    with writing(directory):
        directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory / LOCK, timeout=0)
    try:
        with writing(directory / LOCK):
            lock.acquire()
    except Timeout:
        raise OutputError(f"{command} {directory}: {_holder_message(directory)}") from None
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join(["tunelab", *sys.argv[1:]]) if sys.argv else command}
        with atomic_file(directory / LOCK_INFO) as tmp:
            tmp.write_text(json.dumps(info))
        yield
    finally:
        (directory / LOCK_INFO).unlink(missing_ok=True)
        lock.release()


def _holder_message(directory: Path) -> str:
    try:
        info = json.loads((directory / LOCK_INFO).read_text())
    except (OSError, ValueError):
        info = {}
    started = info.get("started")
    when = (f"started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))} "
            f"({_duration(time.time() - started)} ago)") if isinstance(started, (int, float)) else "start time unknown"
    pid = info.get("pid", "?")
    return (f"{directory} is in use by another tunelab process: pid {pid} on {info.get('host', '?')}, {when}, "
            f"running `{info.get('command', '?')}`. One process per output directory: wait for it to finish "
            f"or stop it (kill {pid}); the lock goes away with the process, so there is nothing to clean up")


def holds_run_lock(train: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a recipe's ``train(config, ...)``: check and lock ``config.output_dir`` for the whole run.

    Before anything is loaded, refuses an ``output_dir`` that is a file, a foreign directory or not
    writable; then holds :func:`run_lock` (on rank 0 under torchrun; the other ranks wait for rank 0
    in their first collective, and torchrun stops them when it fails) and marks the directory as a
    run's. OS errors caused by the environment while the run writes become an :class:`OutputError`.
    """
    from tunelab.training.distributed import env_rank

    @functools.wraps(train)
    def locked(config: Any, *args: Any, **kwargs: Any) -> Any:
        if env_rank() != 0:
            return train(config, *args, **kwargs)
        output_dir = Path(config.output_dir)
        refuse_foreign_dir(output_dir)
        check_writable(output_dir)
        with run_lock(output_dir), writing(output_dir):
            if read_marker(output_dir) is None:
                write_marker(output_dir, "run")
            return train(config, *args, **kwargs)

    return locked


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in BOOKKEEPING)


def _existing(paths: Sequence[Path | str]) -> list[Path]:
    return [Path(p).resolve() for p in paths if p is not None and Path(p).exists()]


def _nearest_existing(path: Path) -> Path:
    for item in (path, *path.absolute().parents):
        if item.exists():
            return item
    return Path("/")


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
