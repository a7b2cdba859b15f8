"""The run lock: one process per output directory (part of :mod:`tunelab.training.outputs`).

``flock(2)`` on ``<dir>/.tunelab.lock`` through ``filelock``: the kernel releases it when the
holder ends in any way (``kill -9`` included), so a lock is never stale; ``.tunelab.lock.json``
names the holder (pid, host, start time, command) for the refusal message.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tunelab.errors import OutputError
from tunelab.training.outputs.writes import LOCK, LOCK_INFO, atomic_file, writing

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


def lock_holder(directory: Path) -> dict | None:
    """Who holds ``directory``'s run lock, read without touching the lock (for watchers such as
    ``tunelab board``: probing the ``flock`` would take it for an instant and could refuse a ``train``
    starting at that moment).

    Returns:
        The holder's ``.tunelab.lock.json`` (pid, host, started, command) when that process is alive
        (same host, a process with that pid that started no later than the lock), else None. A holder
        on another host cannot be checked and counts as alive.
    """
    import psutil

    try:
        info = json.loads((directory / LOCK_INFO).read_text())
        pid, started = int(info["pid"]), float(info["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if info.get("host") not in (None, socket.gethostname()):
        return info
    try:
        process = psutil.Process(pid)
        # not a later process reusing the pid, nor one that ended and awaits its parent (its lock is gone)
        alive = process.create_time() <= started + 1.0 and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return info if alive else None


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


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
