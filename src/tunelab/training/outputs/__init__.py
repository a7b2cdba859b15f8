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

from tunelab.training.outputs.checks import (
    BEFORE_TRAINING, MODEL_KINDS, RUN_MARKERS, check_out_dir, check_out_file, check_output_dir, check_writable,
    claim_output_dir, holds_run_lock, refuse_foreign_dir, resume_target,
)
from tunelab.training.outputs.lock import lock_holder, refuse_if_locked, run_lock
from tunelab.training.outputs.writes import (
    BOOKKEEPING, ENVIRONMENT_ERRNOS, LOCK, LOCK_INFO, MARKER, atomic_dir, atomic_file, atomic_output_dir, commit_dir,
    environment_error_message, read_marker, write_marker, writing, writing_checkpoint,
)

__all__ = [
    "BEFORE_TRAINING", "BOOKKEEPING", "ENVIRONMENT_ERRNOS", "LOCK", "LOCK_INFO", "MARKER", "MODEL_KINDS", "RUN_MARKERS",
    "atomic_dir", "atomic_file", "atomic_output_dir", "check_out_dir", "check_out_file", "check_output_dir",
    "check_writable", "claim_output_dir", "commit_dir", "environment_error_message", "holds_run_lock", "lock_holder", "read_marker",
    "refuse_foreign_dir", "refuse_if_locked", "resume_target", "run_lock", "write_marker", "writing",
    "writing_checkpoint",
]
