"""Write where replies stop into saved models, so other tools stop there too.

transformers' ``generate`` and pipelines, vLLM and llama.cpp's converter read the stop ids from
``generation_config.json`` (``eos_token_id``, an int or a list) and ``config.json``; a base model's
files often name only its pre-training EOS, so a chat fine-tune served elsewhere would run past
its end-of-turn token. :func:`apply_stop_ids` puts every id of
:func:`tunelab.data.stop_tokens.stop_token_ids` there before ``save_pretrained``;
:func:`write_generation_config` writes the file beside a LoRA adapter, which has no model config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.data.stop_tokens import stop_token_ids


def apply_stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """Set ``model.generation_config`` and ``model.config`` ``eos_token_id`` to the stop-id list.

    Also sets ``pad_token_id`` (the tokenizer's) so ``generate`` does not warn. Returns the ids;
    an empty list (no EOS, no end-of-turn token) leaves the model untouched.
    """
    ids = stop_token_ids(tokenizer)
    if not ids:
        return ids
    value = ids if len(ids) > 1 else ids[0]
    model.config.eos_token_id = value
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = value
        if tokenizer.pad_token_id is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return ids


def write_generation_config(directory: str | Path, tokenizer: Any, model: Any = None) -> list[int]:
    """Write ``generation_config.json`` with the stop ids into ``directory`` (e.g. an adapter folder).

    Starts from ``model.generation_config`` when given (keeps its sampling defaults), else an empty
    :class:`transformers.GenerationConfig`. Returns the ids written (none: no file written).
    """
    import copy

    from transformers import GenerationConfig

    ids = stop_token_ids(tokenizer)
    if not ids:
        return ids
    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    config.eos_token_id = ids if len(ids) > 1 else ids[0]
    if tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    config.save_pretrained(str(directory))
    return ids


def describe_stop_ids(tokenizer: Any, ids: list[int]) -> str:
    """``"[2, 7] (<|im_end|>, <eot>)"``: the ids and their tokens, for the log line."""
    return f"{ids} ({', '.join(tokenizer.convert_ids_to_tokens(ids))})"
