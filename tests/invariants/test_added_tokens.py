"""Issue 13 item 10: model.add_special_tokens adds tokens, mean-initialises and trains their rows,
saves them as PEFT modules_to_save, and reload / merge / peft resize the base from the run's tokenizer."""

import json

import pytest
import torch
from safetensors import safe_open

from tests.artifact_fixtures import bpe_tokenizer, word_tokenizer
from tests.conftest import make_tiny_llama
from tunelab.errors import ModelLoadError
from tunelab.models.vocab import add_special_tokens, resize_for_tokenizer

TOKENS = ["<tool_call>", "</tool_call>"]


@pytest.mark.parametrize("family,tie", [("word", True), ("bpe", False)])
def test_new_rows_are_the_mean_and_the_vocabulary_modules_are_named(family, tie):
    tok = word_tokenizer() if family == "word" else bpe_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok), tie=tie)
    old = model.get_input_embeddings().weight.detach().clone()
    added = add_special_tokens(tok, [*TOKENS, tok.eos_token])  # an existing token is not added again
    assert added == TOKENS and tok("a <tool_call> b", add_special_tokens=False).input_ids.count(
        tok.convert_tokens_to_ids("<tool_call>")) == 1
    modules = resize_for_tokenizer(model, tok, added)
    assert modules == ["model.embed_tokens", "lm_head"]
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(tok) == old.shape[0] + 2
    assert torch.equal(weight[:old.shape[0]], old)
    assert torch.allclose(weight[-2:], old.mean(dim=0).expand(2, -1))
    assert torch.allclose(model.get_output_embeddings().weight[-2:], model.get_output_embeddings().weight[:-2].mean(0))


def _train(tmp_path):
    from tunelab.config.load import load_config
    from tunelab.recipes import get_recipe

    tok = bpe_tokenizer()
    make_tiny_llama(vocab_size=len(tok), tie=True).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    data = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": "what is a tool call"},
                          {"role": "assistant", "content": "<tool_call> hello world </tool_call>"}]}] * 8
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "c.yaml"
    config.write_text(f"""
output_dir: {tmp_path / 'run'}
model: {{name_or_path: {tmp_path / 'base'}, add_special_tokens: ["<tool_call>", "</tool_call>"]}}
data: {{train: {{path: {data}}}, max_seq_len: 64}}
lora: {{r: 2, alpha: 4, target_modules: [q_proj, v_proj]}}
train: {{max_steps: 3, grad_accum: 1, lr: 0.05, warmup_steps: 0, threads: 1}}
eval: {{sample_questions: 0, before_training: false}}
""")
    get_recipe("sft")(load_config(config, []))
    return tok, tmp_path / "run"


def test_added_tokens_train_save_reload_merge_and_peft(tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from tunelab.cli.app import app
    from tunelab.models.loading import load_tokenizer
    from tunelab.models.run import load_run

    base_tok, run = _train(tmp_path)
    n = len(base_tok) + 2
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.embed_tokens", "lm_head"]
    with safe_open(str(run / "adapter_model.safetensors"), framework="pt") as f:
        embed = f.get_tensor("base_model.model.model.embed_tokens.weight")
    assert embed.shape[0] == n
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    mean = base.get_input_embeddings().weight.mean(dim=0)
    assert not torch.allclose(embed[-2], mean, atol=1e-3)  # the new rows were trained
    ours, tok, _ = load_run(run)
    assert len(tok) == n and ours.get_input_embeddings().weight.shape[0] == n
    ids = tok("what is a tool call <tool_call> hello", return_tensors="pt").input_ids
    base.resize_token_embeddings(n)  # peft: the base resized from the run's tokenizer
    reference = PeftModel.from_pretrained(base, run).eval()
    auto = AutoPeftModelForCausalLM.from_pretrained(run).eval()  # resizes itself from the run's tokenizer
    with torch.no_grad():
        expected = ours(ids).logits
        assert torch.allclose(reference(ids).logits, expected, atol=1e-5)
        assert torch.allclose(auto(ids).logits, expected, atol=1e-5)
    result = CliRunner().invoke(app, ["merge", str(run), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected, atol=1e-5)
    grown = load_tokenizer(str(run))
    grown.add_special_tokens({"additional_special_tokens": ["<extra>"]}, replace_extra_special_tokens=False)
    grown.save_pretrained(run)
    with pytest.raises(ModelLoadError, match=f"embedding has {n} rows but its tokenizer has {n + 1} tokens"):
        load_run(run)
