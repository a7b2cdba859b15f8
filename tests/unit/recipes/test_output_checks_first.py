"""Every recipe checks its output_dir before loading data or a model (issue 15 item 8): an output path
below a file, or on a full/read-only disk, is named at once, whatever else is wrong. The old code
loaded the data (and failed on it, or spent minutes on the model) before looking at output_dir."""

from __future__ import annotations

import errno
import importlib
import os

import pytest

from tunelab.config.load import validate_config
from tunelab.errors import OutputError
from tunelab.recipes import RECIPES
from tunelab.training import outputs


def config(tmp_path, task, output_dir):
    raw = {"task": task, "output_dir": str(output_dir), "model": {"name_or_path": str(tmp_path / "no-model")},
           "data": {"train": {"path": str(tmp_path / "no-data.jsonl")}}, "train": {"max_steps": 1}}
    if task in ("grpo", "ppo"):
        raw["rl"] = {"rewards": [{"type": "exact_match"}]}
    if task == "classification":
        raw["classification"] = {"text_field": "text", "label_field": "label"}
    return validate_config(raw)


@pytest.mark.parametrize("task", sorted(RECIPES))
def test_an_output_dir_below_a_file_is_named_before_data_or_model_loading(tmp_path, task):
    (tmp_path / "taken").write_text("a file")
    train = importlib.import_module(RECIPES[task]).train
    with pytest.raises(OutputError, match=f"output_dir {tmp_path / 'taken' / 'run'} lies below"):
        train(config(tmp_path, task, tmp_path / "taken" / "run"))
    assert (tmp_path / "taken").read_text() == "a file"


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_an_unwritable_output_dir_is_named_before_data_or_model_loading(tmp_path, task, monkeypatch):
    monkeypatch.setattr(outputs.writes, "probe_write", lambda d: OSError(errno.EROFS, os.strerror(errno.EROFS)))
    train = importlib.import_module(RECIPES[task]).train
    with pytest.raises(OutputError, match=f"cannot write output_dir {tmp_path / 'run'}: read-only file system"):
        train(config(tmp_path, task, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_an_unreadable_file_met_by_a_command_is_one_line_on_stderr(monkeypatch, capsys):
    from tunelab.cli import app as cli

    def unreadable():
        raise PermissionError(errno.EACCES, "Permission denied", "/data/train.jsonl")

    monkeypatch.setattr(cli, "app", unreadable)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == "error: permission denied: /data/train.jsonl"
