"""Stopping a run cleanly on SIGTERM or SIGINT (cluster preemption, ``docker stop``, Ctrl-C).

While :class:`StopSignals` is active (the optimizer loop of :func:`tunelab.training.loop.fit`), the
first SIGTERM or SIGINT only sets a flag: the current optimizer step finishes, a checkpoint of it is
written (atomically, as always), and :class:`RunInterrupted` is raised; the CLI prints the command that
resumes the run and exits with status ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT), the
status a shell, Kubernetes and Slurm report for a process ended by that signal, which job wrappers
read as "preempted, requeue". A second signal exits at once with the same status (the checkpoints
already written are intact: every write is atomic).

Handlers are installed only in the main thread (Python delivers signals there; elsewhere the
context does nothing) and the previous handlers are restored on exit. With several ranks each one
gets the signal at a slightly different moment, so the flag is all-reduced at every step boundary
and all ranks stop after the same step and write one checkpoint together. torchrun relays a SIGTERM
(or SIGINT) it gets to every worker and waits for them (then SIGKILLs them after its shutdown timeout);
a Ctrl-C in a terminal reaches the workers both directly and relayed, so under torchrun a repeat within
2 s counts as the same signal.

This module imports no torch, so the CLI can catch :class:`RunInterrupted` cheaply.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def interrupted_exit_status(signum: int) -> int:
    """The exit status of a run stopped by ``signum``: ``128 + signum`` (143 SIGTERM, 130 SIGINT)."""
    return 128 + signum


class RunInterrupted(Exception):
    """Training stopped on a signal after ``step`` with a checkpoint written at ``checkpoint``.

    Not a :class:`~tunelab.errors.TunelabError`: nothing is wrong with the input; the CLI exits
    with :func:`interrupted_exit_status` instead of 2.
    """

    def __init__(self, signum: int, step: int, checkpoint: Any):
        super().__init__(f"{signal.Signals(signum).name} received: stopped after step {step}, "
                         f"checkpoint {checkpoint} written")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_status(self) -> int:
        """``128 + signum``."""
        return interrupted_exit_status(self.signum)


class StopSignals:
    """Context manager turning the first SIGTERM/SIGINT into a stop request; a second one exits at once."""

    def __init__(self, same_signal_s: float | None = None) -> None:
        """``same_signal_s``: a repeat that comes sooner than this after the first signal is taken as the
        same one (default: 2 s under torchrun, whose agent relays a Ctrl-C or SIGTERM to the workers that
        a terminal's Ctrl-C already reached; 0 otherwise)."""
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._first_at = 0.0
        under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
        self.same_signal_s = same_signal_s if same_signal_s is not None else (2.0 if under_torchrun else 0.0)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None and time.monotonic() - self._first_at < self.same_signal_s:
            return
        if self.signum is not None:  # os.write, not print: a handler may interrupt a print
            os.write(2, f"\n{name} received again: exiting now, without a checkpoint of this step\n".encode())
            os._exit(interrupted_exit_status(signum))
        self.signum, self._first_at = signum, time.monotonic()
        os.write(2, f"\n{name} received: finishing this step and writing a checkpoint "
                    f"(send it again to exit at once)\n".encode())

    def requested(self, runtime: Any) -> int | None:
        """The signal to stop on, agreed by every rank (collective: call it at every step boundary).

        ``runtime`` is a :class:`~tunelab.training.distributed.Runtime`; returns None when no rank got
        a signal, else this rank's signal (SIGTERM for a rank that got none itself).
        """
        if runtime.sum([1.0 if self.signum is not None else 0.0])[0] == 0:
            return None
        return self.signum or int(signal.SIGTERM)
