"""`tunelab train` → run dir → peft load, merge, chat — on the real SmolLM2 weights, a few steps."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    config = root / "c.yaml"
    config.write_text(f"""
output_dir: {root / 'run'}
model: {{name_or_path: smollm2-135m-instruct}}
data:
  train: {{path: "builtin:chatterbot", name: "tech_support,computers", split: train}}
  validation: {{path: "builtin:chatterbot", name: "tech_support,computers", split: validation}}
  max_seq_len: 128
lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
train: {{max_steps: 2, grad_accum: 1, threads: 2, save_every: 1, keep_last: 1}}
eval: {{sample_questions: 1, max_new_tokens: 8}}
""")
    result = subprocess.run([sys.executable, "-m", "tunelab", "train", str(config)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "held-out loss" in result.stdout
    return root / "run"


def test_run_dir_is_complete(run_dir):
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "config.yaml",
                 "tunelab.json", "metrics.jsonl", "loss_curve.png", "before_training.json"):
        assert (run_dir / name).is_file(), name
    info = json.loads((run_dir / "tunelab.json").read_text())
    assert info["results"]["held_out_before"]["loss"] > 0 and info["results"]["steps"] == 2
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000002"]


def test_peft_loads_the_run_and_merge_matches(run_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.models.run import load_run

    ours, tokenizer, info = load_run(run_dir)
    base = AutoModelForCausalLM.from_pretrained(info["base_model_path"])
    peft_model = PeftModel.from_pretrained(base, run_dir).eval()
    ids = tokenizer("My printer is not printing.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, peft_model(ids).logits, atol=1e-5)
    out = tmp_path / "merged"
    result = subprocess.run([sys.executable, "-m", "tunelab", "merge", str(run_dir), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, ours(ids).logits, atol=1e-4)


def test_chat_one_shot(run_dir):
    result = subprocess.run([sys.executable, "-m", "tunelab", "chat", str(run_dir), "--prompt", "Hi",
                             "--max-new-tokens", "5"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "assistant>" in result.stdout


def test_resume_continues_from_checkpoint(run_dir):
    config = run_dir / "config.yaml"
    first = json.loads((run_dir / "tunelab.json").read_text())["results"]
    result = subprocess.run([sys.executable, "-m", "tunelab", "train", str(config), "train.max_steps=3", "--resume"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == [1, 2, 3]
    resumed = json.loads((run_dir / "tunelab.json").read_text())["results"]
    # measured before the first segment's first step, not again: kept, not lost
    assert first["held_out_before"] and resumed["held_out_before"] == first["held_out_before"]
    assert [s["before"] for s in resumed["samples"]] == [s["before"] for s in first["samples"]]
