"""Tiny byte-level BPE tokenizers and models built in code, for GGUF export tests."""

from __future__ import annotations

import pytest
import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "How do I reset my password?", "Click Settings, then Security.",
    "My printer says it is offline again!", "Restart the router and wait 30 seconds.", "Thanks, that worked.",
    "What's the capital of France? Paris.", "I'd like to cancel my order #4521.", "We've shipped it on 2024-05-01.",
    "Numbers: 1234567 and 3.14159; symbols: @#$%^&*()", "naïve café über straße", "tabs\tand\nnewlines  spaces",
]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_byte_bpe_tokenizer(pre: str = "gpt-2", vocab_size: int = 400):
    """A trained byte-level BPE (GPT-2 alphabet) with ChatML specials and one user-defined added token.

    ``pre``: any name in :data:`tunelab.export.tokenizer_gguf.PRE_TOKENIZERS` (``gpt-2``: ByteLevel
    with its own regex, as the SmolLM2 tokenizer tunelab loads; ``qwen2``/``llama-bpe``: a Split regex).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tunelab.export.tokenizer_gguf import PRE_TOKENIZERS

    backend = Tokenizer(models.BPE())
    if pre == "gpt-2":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif pre == "smollm":  # digits one by one, then GPT-2's split (SmolLM2's own tokenizer.json)
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        regex = PRE_TOKENIZERS[pre][0]["pattern"]["Regex"]
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.add_tokens(["<think>"])  # user-defined: matched whole, not special
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})  # a token "the run added"
    tokenizer.chat_template = CHATML
    return tokenizer


def make_tiny(model_type: str, vocab_size: int, tie: bool = True, seed: int = 0, **overrides):
    """A 2-layer random causal LM of ``model_type`` (llama, qwen2, gemma3_text), fp32, GQA 4/2 heads."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tie, pad_token_id=0, bos_token_id=0, eos_token_id=2)
    if model_type == "llama":
        config = transformers.LlamaConfig(**common, **overrides)
        model = transformers.LlamaForCausalLM(config)
    elif model_type == "qwen2":
        config = transformers.Qwen2Config(**common, **overrides)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.Gemma3TextConfig(**{**common, "head_dim": 256, "query_pre_attn_scalar": 256,
                                                  "sliding_window": 64, **overrides})
        model = transformers.Gemma3ForCausalLM(config)
    with torch.no_grad():  # norms away from their init (Gemma's is 0: the +1 shift must show)
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    model.eval()
    return model


@pytest.fixture(scope="session")
def bpe_tokenizer():
    return make_byte_bpe_tokenizer()
