"""Item 5 of issue 15, and full disks at every save point: a run that stops after its last checkpoint but
before its final files (kill -9, a full disk while writing the model) is finished by ``--resume``; a full
disk while writing a checkpoint is one clear error, earlier checkpoints stay intact, ``--resume`` finishes."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest
import torch
from rich.console import Console

import tunelab.models.run as run_module
from tests.faults.tiny import assert_same_run, in_child, train_tiny
from tunelab.config.load import validate_config
from tunelab.errors import TunelabError
from tunelab.training.manifest import manifest_problems

QUIET = Console(quiet=True)


def sft_config(tmp_path, model_dir):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(12)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return validate_config({
        "output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(model_dir)},
        "data": {"train": {"path": str(tmp_path / "data.jsonl")}, "val_fraction": 0.25, "max_seq_len": 64},
        "lora": {"r": 4, "alpha": 8}, "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "threads": 1},
        "eval": {"sample_questions": 1, "max_new_tokens": 2, "batch_size": 4}})


def assert_finished(run, steps):
    assert (run / "adapter_model.safetensors").is_file() and (run / "adapter_config.json").is_file()
    assert json.loads((run / "tunelab.json").read_text())["results"]["steps"] == steps


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1]) if len(args) > 1 else None)


def test_a_full_disk_while_writing_the_final_model_is_finished_by_resume(tmp_path, tiny_model_dir, monkeypatch):
    from tunelab.recipes.sft import train

    config = sft_config(tmp_path, tiny_model_dir)
    with monkeypatch.context() as mp:
        mp.setattr(run_module, "save_adapter", no_space)
        with pytest.raises((OSError, TunelabError)):  # a plain OSError today; item 8 may word it
            train(config, console=QUIET)
    run = tmp_path / "run"
    assert not (run / "tunelab.json").exists() and (run / "checkpoints" / "step-000002").is_dir()
    results = train(config, resume=True, console=QUIET)  # the old code said "the run is finished"
    assert results["steps"] == 2 and results["held_out_after"]
    assert_finished(run, 2)
    with pytest.raises(TunelabError, match="the run is finished"):  # now it is
        train(config, resume=True, console=QUIET)


def test_kill_9_while_the_final_files_are_moved_into_place_is_finished_by_resume(tmp_path, tiny_model_dir):
    from tunelab.recipes.sft import train

    config = sft_config(tmp_path, tiny_model_dir)
    real_replace = os.replace

    def killed_run():
        def replace(src, dst):
            if str(dst).endswith("adapter_model.safetensors"):
                real_replace(src, dst)  # the new adapter is in place, tunelab.json is not
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst)

        run_module.os.replace = replace
        train(config, console=QUIET)

    assert in_child(killed_run, timeout_s=120) == -signal.SIGKILL
    assert not (tmp_path / "run" / "tunelab.json").exists()
    train(config, resume=True, console=QUIET)
    assert_finished(tmp_path / "run", 2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("full") / "run")


@pytest.mark.parametrize("failing_save", [1, 2, 3])  # checkpoints at steps 2, 4 and the final one at 6
def test_a_full_disk_at_each_checkpoint_is_one_clear_error_and_resume_finishes_the_run(
        uninterrupted, tmp_path, monkeypatch, failing_save):
    out, saves = tmp_path / "run", []
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            saves.append(1)
            if len(saves) == failing_save:
                real_save(obj, path, *args, **kwargs)  # part of the file is on disk, then the disk is full
                no_space(obj, path)
        return real_save(obj, path, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(torch, "save", save)
        with pytest.raises(TunelabError) as err:
            train_tiny(out)
    step = 2 * failing_save
    message = str(err.value)
    assert message.startswith(f"no space left on device while writing checkpoints/step-{step:06d}"), message
    remaining = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert remaining == [f"step-{2 * k:06d}" for k in range(1, failing_save)]  # no half-written one left
    assert all(manifest_problems(out / "checkpoints" / name) == [] for name in remaining)
    assert_same_run(train_tiny(out, resume=True) if remaining else train_tiny(out, overwrite=True), uninterrupted)
