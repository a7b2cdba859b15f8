"""Issue 16: llama.cpp computes the same logits as transformers on tiny exported models of every
supported architecture (llama with default / linear / llama3 RoPE, qwen2, gemma3), tied and untied,
and tokenizes like HF for both pre-tokenizers. This checks the hyperparameters llama.cpp reads
(heads, KV heads, rope base and scaling, norm eps, head_dim) and the tensor layouts in llama.cpp
itself, not in a reader written to match the writer. Skipped only without the llama extra.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.export.conftest import make_byte_bpe_tokenizer, make_tiny
from tunelab.export.gguf_file import write_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="needs the llama extra: pip install 'tunelab[llama]'")
pytestmark = pytest.mark.llama_cpp

TEXT = "<|im_start|>user\nHow do I reset my password? <think> 2024<|im_end|>\n<|im_start|>assistant\nClick"
CASES = [
    ("llama", True, {}),
    ("llama", False, {"rope_theta": 50000.0, "rms_norm_eps": 1e-5}),
    ("llama", True, {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    ("llama", True, {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
                                         "rope_theta": 500000.0}}),
    ("qwen2", True, {}),
    ("qwen2", False, {}),
    ("gemma3_text", True, {"head_dim": 16, "query_pre_attn_scalar": 16}),
]


def _llama_logits(path, ids):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    return llm, np.asarray(llm.scores[: len(ids)])


@pytest.mark.parametrize("model_type,tie,overrides", CASES)
def test_llama_cpp_logits_equal_transformers(tmp_path, bpe_tokenizer, model_type, tie, overrides):
    model = make_tiny(model_type, 416, tie=tie, **overrides)
    path = tmp_path / "m.gguf"
    write_gguf(model, bpe_tokenizer, path, "f32")
    ids = bpe_tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    _, got = _llama_logits(path, ids)
    assert np.abs(got - expected).max() < 2e-3 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "qwen2", "llama-bpe"])
def test_llama_cpp_tokenizes_like_hf(tmp_path, pre):
    tokenizer = make_byte_bpe_tokenizer(pre)
    path = tmp_path / "m.gguf"
    write_gguf(make_tiny("llama", 416), tokenizer, path, "f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, vocab_only=True, verbose=False)
    for text in [TEXT, "Numbers: 1234567 and 3.14159; symbols: @#$%^&*()", "naïve café über straße\ttabs\n\n  x",
                 "<|tool|> called <think> twice<think>", "We've shipped it on 2024-05-01."]:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text)["input_ids"], text


@pytest.mark.parametrize("use_rslora", [False, True])
def test_llama_cpp_applies_the_lora_gguf_like_the_merged_export(tmp_path, bpe_tokenizer, use_rslora):
    """Issue 16: base GGUF + exported LoRA GGUF in llama.cpp == the merged model (and its export)."""
    from typer.testing import CliRunner

    from tunelab.adapters.lora import inject_lora, lora_layers, merge_lora
    from tunelab.cli.app import app
    from tunelab.models.run import save_run

    base = make_tiny("llama", 416, tie=True)
    base.save_pretrained(tmp_path / "base")
    bpe_tokenizer.save_pretrained(tmp_path / "base")
    write_gguf(base, bpe_tokenizer, tmp_path / "base.gguf", "f32")
    inject_lora(base, "all-linear", r=4, alpha=8, use_rslora=use_rslora)
    for _, layer in lora_layers(base):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)
    save_run(tmp_path / "run", base, bpe_tokenizer, method="lora", base_model=str(tmp_path / "base"),
             config_yaml="", results={})
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--adapter", "--out", str(tmp_path / "a.gguf")])
    assert result.exit_code == 0, result.output
    ids = bpe_tokenizer(TEXT)["input_ids"]
    with torch.no_grad():
        expected = merge_lora(base)(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "base.gguf"), lora_path=str(tmp_path / "a.gguf"), n_ctx=128,
                          n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    assert np.abs(got - expected).max() < 2e-3 * max(1.0, np.abs(expected).max())
    _, plain = _llama_logits(tmp_path / "base.gguf", ids)
    assert np.abs(plain - expected).max() > 10 * np.abs(got - expected).max()  # the adapter does change them
