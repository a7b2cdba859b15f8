"""Fixtures for preference tests: a tiny Llama saved with the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from tests.conftest import make_tiny_llama

VOCAB = 49152  # the SmolLM2 tokenizer's vocabulary


@pytest.fixture
def tiny_model_dir(tmp_path, smollm2_tokenizer):
    """A directory loadable by tunelab (config.json + safetensors + tokenizer with chat template)."""
    path = tmp_path / "tiny-llama"
    model = make_tiny_llama(vocab_size=VOCAB)
    model.config.pad_token_id = smollm2_tokenizer.pad_token_id
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path
