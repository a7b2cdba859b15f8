"""The training loop on a full disk (a write wrapper raising ENOSPC, and a real 400 KiB tmpfs) and its
progress lines when stdout is not a terminal (issue 15 items 8 and 9)."""

from __future__ import annotations

import re
import subprocess

import pytest
import torch

from tunelab.config.schema import TrainConfig
from tunelab.data.batching import sft_batch_plan
from tunelab.errors import OutputError
from tunelab.models.causal_lm import lm_loss
from tunelab.training import checkpoint
from tunelab.training.loop import fit
from tests.conftest import make_tiny_llama
from tests.invariants.test_training import examples


def train(output_dir, max_steps=4, resume_from=None, quiet=True, **train):
    torch.manual_seed(0)
    model = make_tiny_llama()
    cfg = TrainConfig(**{"max_steps": max_steps, "batch_size": 2, "grad_accum": 1, "lr": 1e-2, "save_every": 2,
                         "keep_last": 5, "method": "full", **train})
    plan = sft_batch_plan(examples(), batch_size=cfg.batch_size, max_seq_len=64, packing=True, shuffle=True,
                          seed=0, pad_token_id=0)
    return fit(model, plan, lm_loss, lambda b: b["num_supervised"], cfg, output_dir, "cfg",
               resume_from=resume_from, quiet=quiet)


def test_enospc_while_writing_a_checkpoint_names_it_and_keeps_the_earlier_ones(tmp_path, monkeypatch):
    real_save = checkpoint.torch.save
    writes = []

    def full_disk_at_step_4(obj, path, *args, **kwargs):
        writes.append(path)
        if "step-000004" in str(path):
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_at_step_4)
    with pytest.raises(OutputError) as err:
        train(tmp_path / "run")
    assert str(err.value).startswith(
        f"no space left on device while writing checkpoints/step-000004 in {tmp_path / 'run'}")
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]  # no half-written step-000004 left
    monkeypatch.setattr(checkpoint.torch, "save", real_save)  # space freed: the run is finishable
    result = train(tmp_path / "run", resume_from=root / "step-000002")
    assert result.state.step == 4 and (root / "step-000004" / "state.json").is_file()


def test_a_real_full_disk_is_reported_by_path_and_the_run_resumes_after_freeing_space(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with pytest.raises(OutputError) as err:  # a full-FT checkpoint of the tiny model takes ~270 KiB
            train(disk / "run")
        message = str(err.value)
        assert message.startswith(f"no space left on device while writing checkpoints/step-000004 in {disk / 'run'}")
        assert "step-000002 are intact" in message
        assert sorted(p.name for p in (disk / "run" / "checkpoints").iterdir()) == ["step-000002"]
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        result = train(disk / "run", resume_from=disk / "run" / "checkpoints" / "step-000002")
        assert result.state.step == 4
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_progress_without_a_terminal_prints_plain_lines_with_loss_lr_speed_and_eta(tmp_path, capsys, monkeypatch):
    """Item 9: the old rich bar printed nothing on a non-terminal until the end."""
    from tunelab.training import progress

    monkeypatch.setattr(progress, "LINES_PER_RUN", 4)  # a line every 8/4 = 2 steps
    train(tmp_path / "run", max_steps=8, quiet=False, save_every=None)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    pattern = re.compile(r"step (\d+)/8 \(\d+%\)  loss \d+\.\d{4} lr \S+ \d+ tok/s  "
                         r"elapsed \d:\d\d:\d\d  eta \d:\d\d:\d\d")
    assert all(pattern.fullmatch(line) for line in lines), lines
    steps = [int(pattern.fullmatch(line).group(1)) for line in lines]
    assert steps == [1, 2, 4, 6, 8]  # the first step, then every 2 steps, and the last
    assert "\x1b[" not in "".join(lines)  # no terminal control codes in a log file
