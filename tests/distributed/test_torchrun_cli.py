"""`tunelab train --nproc 2` (torchrun, gloo, CPU) runs the SFT recipe with FSDP end to end, and an
error on one rank stops every rank with the message shown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama with the real SmolLM2 tokenizer saved as a local model, chat data, a config."""
    root = tmp_path_factory.mktemp("cli")
    model = make_tiny_llama(vocab_size=len(smollm2_tokenizer))
    model.save_pretrained(root / "model")
    smollm2_tokenizer.save_pretrained(root / "model")
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}." + " Indeed." * (i % 4)}]}
            for i in range(20)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = root / "config.yaml"
    config.write_text(
        f"model: {{name_or_path: {root / 'model'}}}\n"
        f"data: {{train: {{path: {root / 'data.jsonl'}}}, val_fraction: 0.2, max_seq_len: 64}}\n"
        f"output_dir: {root / 'run'}\n"
        "lora: {r: 4, alpha: 8}\n"
        "train: {max_steps: 3, batch_size: 2, grad_accum: 1, save_every: 2, threads: 1, lr: 1.0e-3}\n"
        "eval: {sample_questions: 1, max_new_tokens: 4, batch_size: 4}\n"
        "distributed: {strategy: fsdp}\n"
    )
    return root, config


def tunelab(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=240, env=env)


def test_nproc_2_fsdp_sft_run_saves_once_in_peft_layout(tiny_run):
    root, config = tiny_run
    result = tunelab("train", str(config), "--nproc", "2", cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = root / "run"
    assert (run / "adapter_config.json").is_file() and (run / "adapter_model.safetensors").is_file()
    info = json.loads((run / "tunelab.json").read_text())
    assert info["results"]["steps"] == 3 and info["results"]["held_out_after"]["loss"] > 0
    assert (run / "checkpoints" / "step-000002" / ".metadata").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # rank 0 alone writes
    assert result.stdout.count("saved") == 1  # rank 0 alone prints

    from tunelab.models.run import load_run

    model, _, _ = load_run(run)  # the consolidated adapter loads onto the base model as usual
    assert sum(1 for n, _ in model.named_parameters() if "lora_A" in n) == 14


def test_error_on_one_rank_stops_all_ranks_with_message(tiny_run):
    root, config = tiny_run
    if not (root / "run" / "tunelab.json").exists():
        pytest.skip("needs the run of the test above")
    started = time.perf_counter()
    # Only rank 0 checks the output dir; rank 1 waits for it in a collective and must be stopped.
    result = tunelab("train", str(config), "--nproc", "2", cwd=root)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "error (rank 0):" in out and "already holds a run" in " ".join(out.split())
    assert time.perf_counter() - started < 120
