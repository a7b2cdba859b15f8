"""A Hugging Face tokenizer as GGUF tokenizer metadata (llama.cpp's ``tokenizer.ggml.*`` keys).

Only byte-level BPE (the GPT-2 family: SmolLM2, Qwen2, Llama 3, ...) is mapped; llama.cpp calls it
``tokenizer.ggml.model = gpt2``. What is written, as llama.cpp's own ``convert_hf_to_gguf.py`` does:

* ``tokens``: one entry per embedding row (id = row). Regular tokens keep their byte-level spelling
  (``Ġthe``); added tokens keep their text (``<|im_end|>``); a row with no token is ``[PAD<id>]``.
* ``token_type``: 1 normal, 3 control (added tokens marked special: llama.cpp never produces them
  from plain text unless asked to parse specials), 4 user-defined (added, not special: always
  matched whole in text). Ids are the HF tokenizer's ids, so tokens a run added keep theirs.
* ``merges`` (``"a b"`` strings, in rank order), ``pre`` (the pre-tokenizer llama.cpp applies before
  the merges, recognised from the tokenizer's own pre-tokenizer definition, see :data:`PRE_TOKENIZERS`),
* BOS/EOS/UNK/pad and end-of-turn ids, ``add_bos_token``/``add_eos_token`` (measured by encoding a
  word, not read from a flag that may be stale), and the chat template string.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import TunelabError

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4

# Pre-tokenizer regexes transformers' tokenizer.json files use (Qwen2, Llama 3).
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp pre-tokenizer name -> the HF pre-tokenizer definition it reproduces (from tokenizer.json).
PRE_TOKENIZERS: dict[str, Any] = {
    "gpt-2": {"type": "ByteLevel", "use_regex": True},
    "smollm": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}],
    "qwen2": [{"type": "Split", "pattern": {"Regex": _QWEN2_SPLIT}}, {"type": "ByteLevel", "use_regex": False}],
    "llama-bpe": [{"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}}, {"type": "ByteLevel", "use_regex": False}],
}


@dataclass
class GGUFVocab:
    """Tokenizer metadata ready to write; ``token_types`` uses :data:`NORMAL`/:data:`CONTROL`/:data:`USER_DEFINED`."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad, eot
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def tokenizer_to_gguf(tokenizer: Any, num_rows: int) -> GGUFVocab:
    """Map a fast HF tokenizer to GGUF metadata for a model with ``num_rows`` embedding rows.

    Raises:
        TunelabError: not a byte-level BPE tokenizer, a pre-tokenizer llama.cpp has no equivalent
            for, or a token id beyond the embedding rows.
    """
    spec = _backend_spec(tokenizer)
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(spec.get("decoder")):
        raise TunelabError(f"GGUF export maps byte-level BPE tokenizers (GPT-2 style: SmolLM2, Qwen2, Llama 3); "
                           f"this tokenizer is {model.get('type')} with decoder {(spec.get('decoder') or {}).get('type')}")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= num_rows:
        raise TunelabError(f"tokenizer has id {max(vocab.values())} but the model has only {num_rows} embedding rows")
    added = {token.content: token for token in tokenizer.added_tokens_decoder.values()}
    by_id = {index: token for token, index in vocab.items()}
    tokens, types = [], []
    for index in range(num_rows):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(USER_DEFINED)
        elif token in added:
            tokens.append(token)
            types.append(CONTROL if added[token].special else USER_DEFINED)
        else:
            tokens.append(token)
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return GGUFVocab(
        tokens=tokens, token_types=types, merges=merges, pre=pre_tokenizer_name(spec.get("pre_tokenizer")),
        special_ids=special_token_ids(tokenizer), chat_template=_template_string(tokenizer),
        **_added_bos_eos(tokenizer),
    )


def pre_tokenizer_name(pre: Any) -> str:
    """llama.cpp's name for an HF pre-tokenizer definition (the ``pre_tokenizer`` of tokenizer.json).

    Only the fields that change how text is split are compared (the regex, digit splitting, whether
    ByteLevel applies the GPT-2 regex itself).

    Raises:
        TunelabError: no llama.cpp pre-tokenizer splits text the same way; lists the known ones.
    """
    shape = _pre_shape(pre)
    for name, known in PRE_TOKENIZERS.items():
        if _pre_shape(known) == shape:
            return name
    raise TunelabError(f"no llama.cpp pre-tokenizer matches this tokenizer's pre-tokenizer {json.dumps(pre)[:300]}; "
                       f"supported: {', '.join(PRE_TOKENIZERS)}")


def _pre_shape(pre: Any) -> tuple:
    if pre is None:
        return ()
    steps = pre if isinstance(pre, list) else pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    keys = {"ByteLevel": ("use_regex",), "Digits": ("individual_digits",), "Split": ("pattern",)}
    return tuple((step["type"], *(json.dumps(step.get(k), sort_keys=True) for k in keys.get(step["type"], ())))
                 for step in steps)


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """BOS/EOS/UNK/pad ids, and ``eot``: the token that ends an assistant turn in the chat template.

    The end-of-turn token is found by rendering a one-turn conversation and reading the special token
    right after the reply (``<|im_end|>`` for ChatML, ``<end_of_turn>`` for Gemma); none without a template.
    """
    ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")}
    ids = {name: value for name, value in ids.items() if value is not None}
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        ids["eot"] = tokenizer.convert_tokens_to_ids(eot)
    return ids


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The added token the chat template writes right after an assistant reply, or None."""
    if not tokenizer.chat_template:
        return None
    reply = "XQZreplyXQZ"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}],
                                             tokenize=False)
    except Exception:  # templates raise their own errors (jinja2 TemplateError, ValueError, ...)
        return None
    after = text[text.rindex(reply) + len(reply):].lstrip()
    for token in sorted(tokenizer.added_tokens_decoder.values(), key=lambda t: -len(t.content)):
        if token.content and after.startswith(token.content):
            return token.content
    return None


def _added_bos_eos(tokenizer: Any) -> dict[str, bool]:
    ids = tokenizer("a")["input_ids"]
    return {"add_bos": tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id],
            "add_eos": tokenizer.eos_token_id is not None and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id}


def _template_string(tokenizer: Any) -> str | None:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        return template.get("default") or next(iter(template.values()), None)
    return template


def _backend_spec(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TunelabError(f"GGUF export needs a fast (tokenizers-backed) tokenizer; got {type(tokenizer).__name__}")
    return json.loads(backend.to_str())


def _is_byte_level(decoder: Any) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "Sequence":
        return any(_is_byte_level(d) for d in decoder.get("decoders", []))
    return decoder.get("type") == "ByteLevel"
