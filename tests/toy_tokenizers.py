"""Toy tokenizers and chat templates built in code (no files, no hub), for data → tokens tests.

* :func:`byte_bpe_tokenizer`: a byte-level BPE (GPT-2 style pre-tokenizer: a leading space merges
  into the next word) trained on a few strings, with a Llama-3-like template whose end-of-turn
  token ``<|eot_id|>`` is not its EOS ``<|end_of_text|>``. ``adds_bos=True`` makes the tokenizer's
  post-processor add ``<|begin_of_text|>`` on its own (the double-BOS setup when the template writes
  it too).
* :func:`word_tokenizer`: a word-level vocabulary (whitespace/punctuation split) with a Gemma-like
  template (``<start_of_turn>model`` / ``<end_of_turn>``).
* Templates that are not prefix-stable: :data:`REASONING_TEMPLATE` drops ``<think>`` blocks of every
  reply but the last message, :data:`DATED_TEMPLATE` writes today's date into the last user turn.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "Q: capital of France? A: Paris", "Q: capital of Spain? A: Madrid", "A: Paris A: London A: Rome",
    "the capital of France is Paris and the capital of Italy is Rome", "Hello there, how are you today?",
    "Check the paper tray. Restart it, then reinstall the driver.", "I think so. Let me think about it.",
    "My printer is not printing. Still nothing. Thanks, that worked!", "Today is a good day to learn.",
] * 3

LLAMA3_LIKE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# the same family without the BOS in the template (the tokenizer's post-processor may add one)
LLAMA3_LIKE_NO_BOS = LLAMA3_LIKE.removeprefix("{{ bos_token }}")
# a default system prompt written when the conversation has none (as SmolLM2's and Qwen2.5's do)
LLAMA3_LIKE_DEFAULT_SYSTEM = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nYou are a toy helper.<|eot_id|>' }}{% endif %}"
    + LLAMA3_LIKE.removeprefix("{{ bos_token }}")
)
GEMMA_LIKE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
REASONING_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1].lstrip() }}"
    "{% else %}{{ m['content'] }}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
DATED_TEMPLATE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
    "{% if loop.last and m['role'] == 'user' %} (today is {{ strftime_now('%Y-%m-%d') }}){% endif %}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
BPE_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|pad|>"]
WORD_SPECIALS = ["<unk>", "<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]


def byte_bpe_tokenizer(template: str | None = LLAMA3_LIKE, adds_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (about 400 tokens) with a Llama-3-like template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=BPE_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if adds_bos:
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]),
        ])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  pad_token="<|pad|>", additional_special_tokens=BPE_SPECIALS[2:5])
    out.chat_template = template
    return out


def word_tokenizer(template: str | None = GEMMA_LIKE) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (every word and punctuation mark one token) with a Gemma-like template."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    trainer = trainers.WordLevelTrainer(special_tokens=WORD_SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS + ["user model system x y"], trainer)
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>", additional_special_tokens=WORD_SPECIALS[4:])
    out.chat_template = template
    return out
