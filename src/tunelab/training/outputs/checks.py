"""Which output paths a command may write or replace (part of :mod:`tunelab.training.outputs`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import OutputError, TunelabError
from tunelab.training.outputs import writes
from tunelab.training.outputs.lock import refuse_if_locked, run_lock
from tunelab.training.outputs.writes import (
    BOOKKEEPING, BOOKKEEPING_TMP, describe_os_error, nearest_existing, read_marker, write_marker, writing,
)

BEFORE_TRAINING = "before_training.json"
# Names only a tunelab run writes into its output_dir; any of them marks an (old or interrupted) run.
RUN_MARKERS = ("tunelab.json", "checkpoints", "metrics.jsonl", "reference_logps", BEFORE_TRAINING)
# Kinds of directory that merge/export --overwrite may replace.
MODEL_KINDS = ("merged", "export")


def check_output_dir(output_dir: Path, resume: bool | str | None, overwrite: bool) -> Path | None:
    """``train``'s check of its ``output_dir``; returns the checkpoint to resume from, if any.

    With ``overwrite`` nothing is deleted here: the replaced run's checkpoints are removed by
    :func:`tunelab.training.loop.fit` just before the first step, after data and model loading
    succeeded, so an ``--overwrite`` that fails on bad input leaves the old run resumable.

    Inside a recipe's ``train`` (decorated with :func:`holds_run_lock`) it first takes the run lock.

    Raises:
        OutputError: another process holds the directory (naming it); the directory holds a run
            (finished or interrupted: checkpoints, metrics,
            before-training results) and neither resume nor overwrite was asked for; it is a
            file; it is not empty and holds no tunelab run (never written into, even with
            ``overwrite``).
        TunelabError: resume was asked for and there is no checkpoint to resume from.
    """
    claim_output_dir(output_dir)  # the run lock, inside a train() decorated with holds_run_lock
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
        state = "finished"
    else:
        state = "interrupted: no tunelab.json yet, "
        state += f"latest checkpoint {checkpoints[-1].name}" if checkpoints else "no checkpoint"
    how = "pass --resume to continue it, " if checkpoints else ""
    return (f"{output_dir} already holds a run ({state}); {how}pass --overwrite to replace it, or choose another "
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
    where = nearest_existing(path)
    err = writes.probe_write(where)
    if err is not None:
        raise OutputError(f"cannot write {what} {path}: {describe_os_error(err)} (in {where})")


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


@dataclass
class _Claim:
    """The run lock a decorated ``train`` takes at its :func:`check_output_dir` and releases on return."""

    stack: ExitStack
    directory: Path | None = None


_CLAIM: ContextVar[_Claim | None] = ContextVar("tunelab_output_claim", default=None)


def claim_output_dir(output_dir: Path) -> None:
    """Inside a :func:`holds_run_lock` ``train``: take ``output_dir``'s run lock until it returns, mark the
    directory as a run's. Called by :func:`check_output_dir`, i.e. once the recipe's own early checks
    passed (nothing is created before them); a no-op outside such a ``train`` or when already held.

    Raises:
        OutputError: another process holds the lock (naming it).
    """
    claim = _CLAIM.get()
    if claim is None or claim.directory is not None:
        return
    claim.stack.enter_context(run_lock(output_dir))
    claim.directory = output_dir
    if read_marker(output_dir) is None:
        write_marker(output_dir, "run")


def holds_run_lock(train: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a recipe's ``train(config, ...)``: check ``config.output_dir`` and lock it for the whole run.

    Before anything is loaded, refuses an ``output_dir`` that is a file, a foreign directory, not
    writable or held by a live run. The lock itself is taken by the recipe's
    :func:`check_output_dir` (rank 0 only under torchrun: the other ranks wait for rank 0 in their
    first collective, and torchrun stops them when it fails) and released when ``train`` returns or
    raises. OS errors caused by the environment while the run writes become an :class:`OutputError`.
    """
    from tunelab.training.distributed import env_rank

    @functools.wraps(train)
    def locked(config: Any, *args: Any, **kwargs: Any) -> Any:
        if env_rank() != 0:
            return train(config, *args, **kwargs)
        output_dir = Path(config.output_dir)
        refuse_foreign_dir(output_dir)
        check_writable(output_dir)
        refuse_if_locked(output_dir, "train")
        claim = _Claim(ExitStack())
        token = _CLAIM.set(claim)
        try:
            with claim.stack, writing(output_dir):
                return train(config, *args, **kwargs)
        finally:
            _CLAIM.reset(token)

    return locked


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()
                  if p.name not in BOOKKEEPING and not p.name.startswith(BOOKKEEPING_TMP))


def _existing(paths: Sequence[Path | str]) -> list[Path]:
    return [Path(p).resolve() for p in paths if p is not None and Path(p).exists()]


def _shown(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
