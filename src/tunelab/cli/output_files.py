"""The ``--overwrite`` option of commands that write an ``--out`` file.

The rules and the writing itself live in :mod:`tunelab.training.outputs` (the one place that writes):
``predict``, ``eval``, ``score`` and ``generate-rejected`` check ``--out`` with
:func:`~tunelab.training.outputs.check_out_file` before any expensive work and write it with
:func:`~tunelab.training.outputs.atomic_file`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from tunelab.training.outputs import atomic_file, check_out_file  # noqa: F401  (used by the commands)

# The ``--overwrite`` option of every command that writes an ``--out`` file.
OverwriteOutOpt = Annotated[bool, typer.Option(
    help="Replace --out if it exists (never a file the command reads or one inside an input directory).")]
