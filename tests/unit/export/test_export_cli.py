"""Issue 16: `tunelab export` on runs and model dirs, the Modelfile, and bad input.

A LoRA run exports as base + merged adapter (logits equal the run's, the run dir is untouched);
`--ollama` writes a Modelfile whose template reproduces the chat template; unsupported
architecture / unknown quant / missing llama extra / existing --out are clear user errors.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from typer.testing import CliRunner

from tests.unit.export.conftest import make_tiny
from tunelab.cli.app import app
from tunelab.errors import TunelabError
from tunelab.export.ollama import go_template, modelfile, render_turns, turn_format

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reset?"},
     {"role": "assistant", "content": "Click reset."}, {"role": "user", "content": "Thanks\nbye"}],
]
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
          "m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA_LIKE = ("{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}{% else %}"
              "{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture
def lora_run(tmp_path, bpe_tokenizer):
    from tunelab.adapters.lora import inject_lora, lora_layers
    from tunelab.models.run import save_run

    base = tmp_path / "base"
    model = make_tiny("llama", 416, tie=True)
    model.save_pretrained(base)
    bpe_tokenizer.save_pretrained(base)
    inject_lora(model, "all-linear", r=4, alpha=8)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    save_run(tmp_path / "run", model, bpe_tokenizer, method="lora", base_model=str(base),
             config_yaml="data:\n  system_prompt: You are the support bot.\n", results={})
    return tmp_path / "run"


def test_lora_run_exports_merged_and_untouched(tmp_path, lora_run):
    from transformers import AutoModelForCausalLM

    from tunelab.models.run import load_run

    before = _digest(lora_run)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", str(lora_run), "--quant", "f32", "--ollama", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _digest(lora_run) == before
    run_model, tokenizer, _ = load_run(lora_run)  # base + adapter, unmerged
    back = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    ids = torch.tensor([tokenizer("How do I reset my password?")["input_ids"]])
    with torch.no_grad():
        assert (run_model(ids).logits - back(ids).logits).abs().max().item() < 1e-4
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n")
    assert 'SYSTEM """You are the support bot."""' in text and 'PARAMETER stop "<|im_end|>"' in text


@pytest.mark.parametrize("template", ["chatml", LLAMA3])
def test_modelfile_template_reproduces_the_chat_template(bpe_tokenizer, template):
    from tunelab.data.templates import CHATML

    tokenizer = bpe_tokenizer
    if template == "chatml":
        assert tokenizer.chat_template == CHATML
    else:  # Llama 3 style: BOS text in the template, <|eot_id|> ends a turn, no newline after it
        tokenizer = _with_template(bpe_tokenizer, template, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    fmt = turn_format(tokenizer)
    for messages in CONVERSATIONS:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_turns(fmt, messages) == expected
    body = go_template(fmt)
    assert body.startswith(fmt.start + "{{ range .Messages }}") and body.endswith(fmt.generation_prompt)
    eot = "<|im_end|>" if template == "chatml" else "<|eot_id|>"
    assert f'PARAMETER stop "{eot}"' in modelfile("m.gguf", tokenizer)


def test_modelfile_refuses_a_template_that_merges_turns(bpe_tokenizer):
    tokenizer = _with_template(bpe_tokenizer, GEMMA_LIKE, ["<start_of_turn>", "<end_of_turn>"])
    with pytest.raises(TunelabError, match="Ollama template"):
        modelfile("m.gguf", tokenizer)


def _with_template(tokenizer, template, specials):
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    return tokenizer


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path, bpe_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=416, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt2")
    bpe_tokenizer.save_pretrained(tmp_path / "gpt2")
    result = CliRunner().invoke(app, ["export", str(tmp_path / "gpt2"), "--out", str(tmp_path / "m.gguf")])
    assert isinstance(result.exception, TunelabError)
    assert "'gpt2'" in str(result.exception) and "gemma3_text, llama, qwen2" in str(result.exception)
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".tmp-*"))


def test_unknown_quant_lists_the_choices(tmp_path):
    result = CliRunner().invoke(app, ["export", "RUN", "--quant", "q3_z", "--out", str(tmp_path / "m.gguf")])
    assert isinstance(result.exception, TunelabError)
    assert "unknown --quant 'q3_z'" in str(result.exception) and "q8_0" in str(result.exception)
    assert "q4_k_m" in str(result.exception)


def test_k_quant_without_the_llama_extra_names_it(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    result = CliRunner().invoke(app, ["export", "RUN", "--quant", "q4_k_m", "--out", str(tmp_path / "m.gguf")])
    assert isinstance(result.exception, TunelabError)
    assert "tunelab[llama]" in str(result.exception)


def test_existing_out_is_kept_unless_overwrite(tmp_path, lora_run):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    result = CliRunner().invoke(app, ["export", str(lora_run), "--quant", "q8_0", "--out", str(out)])
    assert isinstance(result.exception, TunelabError) and "already exists" in str(result.exception)
    assert out.read_bytes() == b"keep me"
    result = CliRunner().invoke(app, ["export", str(lora_run), "--quant", "q8_0", "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"GGUF"
    assert json.loads((lora_run / "adapter_config.json").read_text())["r"] == 4
