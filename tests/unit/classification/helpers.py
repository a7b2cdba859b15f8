"""Tiny encoder/decoder classifiers and model directories built in code (random weights, fp32)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_bert_config(vocab_size: int = 120, num_labels: int = 3):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128, num_labels=num_labels,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)


def tiny_llama_config(vocab_size: int = 120, num_labels: int = 3, pad_token_id: int | None = 0):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=True, num_labels=num_labels, pad_token_id=pad_token_id,
                       bos_token_id=1, eos_token_id=2)


def tiny_classifier(kind: str, seed: int = 0, **kwargs):
    """A randomly initialized ``*ForSequenceClassification`` (``kind``: encoder | decoder), eval mode."""
    from transformers import BertForSequenceClassification, LlamaForSequenceClassification

    torch.manual_seed(seed)
    if kind == "encoder":
        model = BertForSequenceClassification(tiny_bert_config(**kwargs))
    else:
        model = LlamaForSequenceClassification(tiny_llama_config(**kwargs))
    model.eval()
    return model


def tiny_base_dir(kind: str, directory: Path, tokenizer, seed: int = 0) -> Path:
    """Save a tiny *base* checkpoint (no classification head) with ``tokenizer`` into ``directory``."""
    from transformers import BertModel, LlamaForCausalLM

    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if kind == "encoder":
        model = BertModel(tiny_bert_config(vocab_size=vocab))
    else:
        model = LlamaForCausalLM(tiny_llama_config(vocab_size=vocab, pad_token_id=None))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
