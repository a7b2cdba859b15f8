"""Toy tokenizers of two families with templates that are not ChatML, a tiny Qwen2, and a scripted model.

* :func:`word_tokenizer`: word-level vocabulary, Gemma-style template (``<start_of_turn>`` …
  ``<end_of_turn>``), EOS ``</s>``.
* :func:`bpe_tokenizer`: byte-level BPE trained here on a few sentences, Llama-3-style template
  (``<|start_header_id|>`` … ``<|eot_id|>``), EOS ``<|end_of_text|>``.
Both are deterministic and built offline in milliseconds.
"""

from __future__ import annotations

import torch

GEMMA_STYLE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}"
)
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
WORDS = ("user assistant system hello world hi how are you fine thanks the a is of to and what tool call "
         "yes no good bad paris france capital").split()


def word_tokenizer(chat_template: str = GEMMA_STYLE, extra_specials: tuple[str, ...] = (),
                   plain_words: tuple[str, ...] = ()):
    """Word-level tokenizer: ids 0 <pad>, 1 <s>, 2 </s>, 3 <unk>, 4 <start_of_turn>, 5 <end_of_turn>, then words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<start_of_turn>", "<end_of_turn>", *extra_specials]
    vocab = {t: i for i, t in enumerate([*specials, *WORDS, *plain_words, "\n"])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                 pre_tokenizers.Split(" ", behavior="removed")])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=specials[4:])
    tok.chat_template = chat_template
    return tok


def bpe_tokenizer(chat_template: str = LLAMA3_STYLE, vocab_size: int = 300):
    """Byte-level BPE with Llama-3-style special tokens (ids 0-4), trained on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    corpus = ["hello world, how are you?", "The capital of France is Paris.", "user assistant system",
              "fine thanks, and you?", "what is a tool call"] * 20
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  additional_special_tokens=specials[2:])
    tok.pad_token = tok.eos_token
    tok.chat_template = chat_template
    return tok


def make_tiny_qwen2(seed: int = 0, vocab_size: int = 97, tie: bool = False):
    """A 2-layer Qwen2 (q/k/v biases, a second architecture family), fp32, random weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Qwen2ForCausalLM(config).eval()


def script_model(model, token_ids: list[int]):
    """Make ``model`` emit ``token_ids`` in order, one per forward call (greedy), whatever its input.

    A forward hook on the output head replaces the last position's logits; the first call is the
    prompt (prefill), each later call one cached decoding step.
    """
    calls = {"n": 0}

    def hook(_module, _inputs, logits):
        target = token_ids[min(calls["n"], len(token_ids) - 1)]
        calls["n"] += 1
        forced = torch.full_like(logits[:, -1:], -1e4)
        forced[..., target] = 1e4
        return torch.cat([logits[:, :-1], forced], dim=1)

    model.get_output_embeddings().register_forward_hook(hook)
    return model
