"""Proof for issue 15: ``kill -9`` at random points of a run, including inside checkpoint writes (a file
half written, a rename not done), then ``--resume`` gives exactly the uninterrupted run (every step's loss
and the final weights). Each trial trains in a forked child (no new interpreter) that SIGKILLs itself."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import safetensors.torch
import torch

import tunelab.training.checkpoint as checkpoint
from tests.faults.tiny import assert_same_run, in_child, train_tiny
from tunelab.errors import TunelabError


class FaultPlan:
    """Counts the run's events (micro-batch losses and every file write or rename) and, at event
    ``kill_at``, kills the process with SIGKILL: before the event, or (``half=True``) after writing
    half of the file."""

    def __init__(self, kill_at: int | None = None, half: bool = False):
        self.kill_at, self.half, self.events, self.writes = kill_at, half, 0, []

    def _hit(self, is_write: bool) -> bool:
        self.events += 1
        if is_write:
            self.writes.append(self.events)
        return self.events == self.kill_at

    def _die(self, path=None) -> None:
        if path is not None and self.half and os.path.isfile(path):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    def install(self, monkeypatch) -> None:
        def writer(real, path_arg):
            def wrapped(*args, **kwargs):
                path = path_arg(args)
                hit = self._hit(True)
                if hit and not self.half:
                    self._die()
                result = real(*args, **kwargs)
                if hit:
                    self._die(path)
                return result
            return wrapped

        monkeypatch.setattr(torch, "save", writer(torch.save, lambda a: a[1]))
        monkeypatch.setattr(checkpoint, "save_file", writer(safetensors.torch.save_file, lambda a: a[1]))
        monkeypatch.setattr(Path, "write_text", writer(Path.write_text, lambda a: a[0]))
        monkeypatch.setattr(os, "replace", writer(os.replace, lambda a: None))

    def on_micro_batch(self, _i: int) -> None:
        if self._hit(False):
            self._die()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("full") / "run")


@pytest.fixture(scope="module")
def event_counts(tmp_path_factory):
    """(number of events in a whole run, the events that are file writes or renames)."""
    plan = FaultPlan()
    with pytest.MonkeyPatch.context() as mp:
        plan.install(mp)
        train_tiny(tmp_path_factory.mktemp("count") / "run", on_micro_batch=plan.on_micro_batch)
    return plan.events, plan.writes


def resume_until_done(out: Path):
    """What a user does after a kill: ``--resume`` (or, with no checkpoint yet, start again)."""
    try:
        return train_tiny(out, resume=True)
    except TunelabError as err:
        assert "no checkpoint" in str(err), err
        return train_tiny(out, overwrite=True)


@pytest.mark.parametrize("seed", range(6))
def test_kill_9_anywhere_then_resume_equals_the_uninterrupted_run(uninterrupted, event_counts, tmp_path, seed):
    total, writes = event_counts
    rng = random.Random(seed)
    kill_at = rng.choice(writes) if seed % 2 == 0 else rng.randint(1, total)  # even seeds: inside a write
    plan = FaultPlan(kill_at, half=rng.random() < 0.5)
    out = tmp_path / "run"

    def killed_run():
        with pytest.MonkeyPatch.context() as mp:
            plan.install(mp)
            train_tiny(out, on_micro_batch=plan.on_micro_batch)

    assert in_child(killed_run) == -signal.SIGKILL
    assert_same_run(resume_until_done(out), uninterrupted)
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
