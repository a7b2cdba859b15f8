"""Item 4 of issue 15 through the command line: ``tunelab train`` stopped by SIGTERM prints the exact
``--resume`` command and exits 143 (128 + SIGTERM); running that command finishes the run, and the
result equals the uninterrupted run's."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys
import time

import pytest
from rich.console import Console
from safetensors.torch import load_file

from tunelab.cli import app as cli
from tunelab.training.interrupt import RunInterrupted


def test_resume_command_is_the_same_command_with_resume():
    assert cli.resume_command(["train", "c.yaml", "train.lr=1e-4"]) == "tunelab train c.yaml train.lr=1e-4 --resume"
    assert cli.resume_command(["train", "my c.yaml", "--overwrite"]) == "tunelab train 'my c.yaml' --resume"
    assert cli.resume_command(["train", "c.yaml", "--resume-from", "x/step-2", "--resume"]) == \
        "tunelab train c.yaml --resume"
    assert cli.resume_command(["train", "c.yaml", "--resume-from=x"]) == "tunelab train c.yaml --resume"


def test_the_cli_prints_the_resume_command_and_exits_128_plus_the_signal(tmp_path, monkeypatch, capsys):
    import tunelab.recipes

    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name_or_path: tiny}}\ndata: {{train: {{path: d.jsonl}}}}\noutput_dir: {tmp_path}\n")

    def stopped_recipe(cfg, **kwargs):
        raise RunInterrupted(signal.SIGINT, 7, tmp_path / "checkpoints" / "step-000007")

    monkeypatch.setattr(tunelab.recipes, "get_recipe", lambda task: stopped_recipe)
    monkeypatch.setattr(cli, "error_console", Console(width=400, stderr=True))
    monkeypatch.setattr(sys, "argv", ["tunelab", "train", str(config), "train.lr=0.1",
                                      "train.report_to=[tensorboard,mlflow]", "--overwrite"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 130
    out = capsys.readouterr().err
    assert "SIGINT received: stopped after step 7" in out
    # a list override printed verbatim (rich markup ate "[tensorboard,mlflow]" before: the pasted command failed)
    assert f"tunelab train {config} train.lr=0.1 'train.report_to=[tensorboard,mlflow]' --resume" in out


def _config(root, model_dir, name):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(16)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = root / f"{name}.yaml"
    path.write_text(f"model: {{name_or_path: {model_dir}}}\ndata: {{train: {{path: {root / 'data.jsonl'}}}, "
                    f"max_seq_len: 64}}\noutput_dir: {root / name}\nlora: {{r: 4, alpha: 8, dropout: 0.1}}\n"
                    "train: {max_steps: 30, batch_size: 2, grad_accum: 1, threads: 1, lr: 1.0e-3, save_every: 100}\n"
                    "eval: {sample_questions: 0, before_training: false}\n")
    return path


def _cli(argv, log):
    """``tunelab ARGV`` in this process with its output in ``log``; returns the exit status."""
    stream = open(log, "a", buffering=1)  # noqa: SIM115 - lives as long as the command
    saved = sys.argv, sys.stdout, sys.stderr, cli.console, cli.error_console
    sys.argv, sys.stdout, sys.stderr = ["tunelab", *argv], stream, stream
    cli.console = cli.error_console = Console(file=stream, width=400)
    try:
        cli.main()
        return 0
    except SystemExit as exit_:
        return exit_.code or 0
    finally:
        sys.argv, sys.stdout, sys.stderr, cli.console, cli.error_console = saved
        stream.close()


def test_sigterm_then_the_printed_command_finishes_the_run_like_an_uninterrupted_one(tmp_path, tiny_model_dir):
    """The interrupted command runs as its own process (forked, so no new interpreter) and gets a real SIGTERM."""
    from tunelab.config.load import load_config
    from tunelab.recipes.sft import train

    config, log = _config(tmp_path, tiny_model_dir, "stopped"), tmp_path / "stopped.log"
    pid = os.fork()
    if pid == 0:
        signal.alarm(120)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)  # the signal handler writes to file descriptor 2
        os._exit(_cli(["train", str(config)], log))
    metrics, deadline = tmp_path / "stopped" / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count('"loss"') >= 3):  # mid-run, no checkpoint yet
        assert os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    os.kill(pid, signal.SIGTERM)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    out = log.read_text()
    assert status == 143, out
    assert "SIGTERM received: finishing this step and writing a checkpoint" in out
    command = next(line.strip() for line in out.splitlines() if line.strip().startswith("tunelab train"))
    assert command == f"tunelab train {config} --resume"
    (checkpoint,) = (tmp_path / "stopped" / "checkpoints").iterdir()
    assert 3 <= json.loads((checkpoint / "state.json").read_text())["step"] < 30  # save_every is 100
    assert _cli(shlex.split(command)[1:], tmp_path / "resumed.log") == 0, (tmp_path / "resumed.log").read_text()
    train(load_config(_config(tmp_path, tiny_model_dir, "whole"), []), console=Console(quiet=True))
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                     if '"loss"' in line] for name in ("stopped", "whole")}
    assert len(losses["stopped"]) == 30 and losses["stopped"] == pytest.approx(losses["whole"], abs=1e-6)
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("stopped", "whole"))
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-6 for k in a)
