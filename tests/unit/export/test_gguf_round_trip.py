"""Issue 16, proof 1: an exported GGUF read back by an independent reader (transformers' GGUF loader).

f32 gives the model's logits within 1e-4 for llama / qwen2 / gemma3, tied and untied heads (this
fails without the q/k permutation, the Gemma norm shift or the tied-head handling); q8_0 keeps top-1
on >= 99% of 2,000 positions; the tokenizer read back gives the same ids, added tokens included.
"""

from __future__ import annotations

import gguf
import pytest
import torch

from tests.unit.export.conftest import make_byte_bpe_tokenizer, make_tiny
from tunelab.export.gguf_file import write_gguf
from tunelab.export.tokenizer_gguf import CONTROL, NORMAL, USER_DEFINED

VOCAB_ROWS = 416  # > len(tokenizer) = 402: the padding rows must come out as [PAD<id>]
PROMPTS = ["<|im_start|>user\nHow do I reset my password?<|im_end|>\n<|im_start|>assistant\n",
           "The quick brown fox <think> jumps over 2024 dogs.", "Click Settings, then Security. <|tool|> ok"]


def _read_back(path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs).eval()


def _logits(model, tokenizer):
    with torch.no_grad():
        return [model(torch.tensor([tokenizer(p)["input_ids"]])).logits[0] for p in PROMPTS]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize("tie", [True, False])
def test_f32_export_reads_back_with_the_same_logits(tmp_path, bpe_tokenizer, model_type, tie):
    model = make_tiny(model_type, VOCAB_ROWS, tie=tie)
    path = tmp_path / "m.gguf"
    write_gguf(model, bpe_tokenizer, path, "f32")
    names = [t.name for t in gguf.GGUFReader(str(path)).tensors]
    assert ("output.weight" in names) is not tie  # a tied head is not written twice
    back = _read_back(path)
    assert back.config.tie_word_embeddings is tie
    for ours, theirs in zip(_logits(model, bpe_tokenizer), _logits(back, bpe_tokenizer)):
        assert (ours - theirs).abs().max().item() < 1e-4


def test_q8_0_keeps_top1_on_2000_positions(tmp_path, bpe_tokenizer):
    model = make_tiny("llama", VOCAB_ROWS, tie=True, seed=3)  # tied, as SmolLM2
    path = tmp_path / "m.gguf"
    write_gguf(model, bpe_tokenizer, path, "q8_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # 1-D tensors stay f32
    back = _read_back(path)
    ids = torch.randint(0, VOCAB_ROWS, (8, 250), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        agree = (model(ids).logits.argmax(-1) == back(ids).logits.argmax(-1)).float().mean().item()
    assert agree >= 0.99


@pytest.mark.parametrize("quant,bound", [("f16", 5e-3), ("bf16", 5e-2)])
def test_half_precision_exports_stay_close(tmp_path, bpe_tokenizer, quant, bound):
    model = make_tiny("qwen2", VOCAB_ROWS, tie=True)
    path = tmp_path / "m.gguf"
    write_gguf(model, bpe_tokenizer, path, quant)
    for ours, theirs in zip(_logits(model, bpe_tokenizer), _logits(_read_back(path), bpe_tokenizer)):
        assert (ours - theirs).abs().max().item() < bound


@pytest.mark.parametrize("pre", ["gpt-2", "qwen2"])
def test_tokenizer_reads_back_with_the_same_ids_and_types(tmp_path, pre):
    from transformers import AutoTokenizer

    tokenizer = make_byte_bpe_tokenizer(pre)
    path = tmp_path / "m.gguf"
    write_gguf(make_tiny("llama", VOCAB_ROWS), tokenizer, path, "f32")
    reader = gguf.GGUFReader(str(path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == VOCAB_ROWS and tokens[-1] == f"[PAD{VOCAB_ROWS - 1}]"
    vocab = tokenizer.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())  # every id is the HF tokenizer's
    assert types[vocab["<|im_end|>"]] == CONTROL and types[vocab["<|tool|>"]] == CONTROL
    assert types[vocab["<think>"]] == USER_DEFINED and types[vocab["Ġt"]] == NORMAL
    assert reader.fields["tokenizer.ggml.pre"].contents() == pre
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == vocab["<|im_end|>"]
    assert reader.fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in [*PROMPTS, "naïve café über straße\ttabs\n\nnewlines", "  leading spaces and 3.14159"]:
        assert back(text)["input_ids"] == tokenizer(text)["input_ids"], text
