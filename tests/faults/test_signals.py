"""Item 4 of issue 15: SIGTERM/SIGINT finish the current optimizer step, write a checkpoint of it, stop
with :class:`RunInterrupted` (exit status 128 + signal), and a resumed run equals the uninterrupted one;
a second signal exits at once; handlers are installed in the main thread only and restored after."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

from tests.faults.tiny import STEPS, assert_same_run, in_child, train_tiny
from tunelab.training.distributed import single_process
from tunelab.training.interrupt import RunInterrupted, StopSignals
from tunelab.training.manifest import manifest_problems


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("full") / "run")


def signal_at(micro_batch: int, signum: int = signal.SIGTERM, times: int = 1):
    def hook(i: int) -> None:
        if i == micro_batch:
            for _ in range(times):
                os.kill(os.getpid(), signum)
    return hook


@pytest.mark.parametrize("signum,micro_batch,stopped_after", [
    (signal.SIGTERM, 5, 3),  # during step 3 (2 micro-batches per step): step 3 finishes, no save_every there
    (signal.SIGINT, 4, 2),   # during step 2, which save_every writes anyway: one checkpoint, not two
    (signal.SIGTERM, 12, 6),  # during the last step: stops before the final evaluation and files
])
def test_a_signal_checkpoints_the_current_step_and_resume_equals_uninterrupted(
        uninterrupted, tmp_path, signum, micro_batch, stopped_after):
    out = tmp_path / "run"
    before = signal.getsignal(signum)
    with pytest.raises(RunInterrupted) as stop:
        train_tiny(out, on_micro_batch=signal_at(micro_batch, signum))
    assert signal.getsignal(signum) is before  # restored
    assert stop.value.step == stopped_after and stop.value.exit_status == 128 + signum
    ckpt = out / "checkpoints" / f"step-{stopped_after:06d}"
    assert stop.value.checkpoint == ckpt and manifest_problems(ckpt) == []
    assert not (out / "checkpoints" / f"step-{stopped_after + 1:06d}").exists()
    assert_same_run(train_tiny(out, resume=True), uninterrupted)


def test_a_second_signal_exits_at_once_without_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    status = in_child(lambda: train_tiny(out, on_micro_batch=signal_at(5, times=2)))
    assert status == 128 + signal.SIGTERM
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]


def test_handlers_are_only_installed_in_the_main_thread():
    seen = {}

    def body():
        with StopSignals() as stop:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["requested"] = stop.requested(single_process())

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == {"handler": before, "requested": None}


class _OtherRankGotIt:
    """A runtime whose all-reduce adds 1 from another rank: that rank was signalled, this one was not."""

    def sum(self, values):
        return [v + 1.0 for v in values]


def test_every_rank_stops_when_any_rank_is_signalled():
    with StopSignals() as stop:
        assert stop.signum is None
        assert stop.requested(single_process()) is None
        assert stop.requested(_OtherRankGotIt()) == signal.SIGTERM


def test_a_run_stopped_on_its_last_step_is_finished_by_resume_with_its_final_evaluation(tmp_path):
    """The stop during step 6 came before the final evaluation: resume evaluates once and does not train."""
    out, evaluated = tmp_path / "run", []

    def evaluate():
        evaluated.append(1)
        return {"loss": 1.5}

    with pytest.raises(RunInterrupted):
        train_tiny(out, on_micro_batch=signal_at(2 * STEPS), evaluate=evaluate)
    assert evaluated == []
    losses, _ = train_tiny(out, resume=True, evaluate=evaluate, on_micro_batch=lambda i: pytest.fail("trained"))
    assert len(losses) == STEPS and evaluated == [1]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/loss" in r] == [STEPS]


def test_under_torchrun_a_relayed_repeat_is_the_same_signal(monkeypatch):
    """torchrun relays the Ctrl-C its workers already got: a repeat within 2 s does not exit at once."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert StopSignals().same_signal_s == 2.0

    def twice():
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signum == signal.SIGINT
        os._exit(5)

    assert in_child(twice) == 5
    monkeypatch.delenv("LOCAL_RANK")
    assert StopSignals().same_signal_s == 0.0


def test_nproc_launcher_relays_sigterm_to_torchrun_and_reports_128_plus_it():
    import subprocess
    import sys

    from tunelab.training.distributed import _wait_relaying_sigterm

    child = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                              "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
                              "print('ready', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "ready\n"
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
    before = signal.getsignal(signal.SIGTERM)
    assert _wait_relaying_sigterm(child) == 143
    assert child.returncode == 7 and signal.getsignal(signal.SIGTERM) is before
