"""One run per output directory (issue 15 item 2), with real processes: while `tunelab train` runs, a
second `train`, a `--resume` of it and a `merge --out` into it are refused naming the holder's pid
and start time; after `kill -9` nothing stale is left. The old code let two
runs write the same directory, the second silently replacing the first's results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from tests.conftest import make_tiny_llama


@pytest.fixture
def slow_run(tmp_path, smollm2_tokenizer):
    model = make_tiny_llama(vocab_size=len(smollm2_tokenizer))
    model.save_pretrained(tmp_path / "model")
    smollm2_tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(16)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model: {{name_or_path: {tmp_path / 'model'}}}\n"
        f"data: {{train: {{path: {tmp_path / 'data.jsonl'}}}, max_seq_len: 96}}\n"
        f"output_dir: {tmp_path / 'run'}\n"
        "lora: {r: 2, alpha: 4}\n"
        "train: {max_steps: 100000, batch_size: 2, grad_accum: 1, save_every: 1, keep_last: 2, threads: 1}\n"
        "eval: {sample_questions: 0, before_training: false}\n"
    )
    return tmp_path, config


def tunelab(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_live_run_refuses_a_second_train_a_resume_and_a_merge_and_kill_9_leaves_no_stale_lock(slow_run):
    root, config = slow_run
    run = root / "run"
    first = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(config)], cwd=root,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        # Any checkpoint shows the run is training (with keep_last: 2 the first one is soon pruned, so a
        # poll for step-000001 alone can miss it on a busy machine).
        while not any((run / "checkpoints").glob("step-*/state.json")):
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline
            time.sleep(0.5)
        for extra in ([], ["--resume"]):
            second = tunelab("train", str(config), *extra, cwd=root)
            assert second.returncode == 2, second.stdout + second.stderr
            message = " ".join(second.stderr.split())
            assert f"pid {first.pid}" in message and "started " in message and "in use by another tunelab" in message
        from tunelab.cli.app import app

        merged = CliRunner().invoke(app, ["merge", str(run), "--out", str(run / "merged")])
        assert f"pid {first.pid}" in str(merged.exception)
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    from tunelab.training.outputs import run_lock

    with run_lock(run):  # kill -9 left no stale lock: --resume can take it at once
        pass
