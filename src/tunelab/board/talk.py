"""Chat with a finished causal-LM run and predict with a finished classifier run, for ``tunelab board``.

Chat renders the conversation with the run's own saved chat template and stops at its stop ids
(:func:`tunelab.models.generate.generate_replies`, which uses :mod:`tunelab.data.stop_tokens`), exactly
as ``tunelab chat``; LoRA adapters are merged in memory. Tokens stream through transformers'
``TextIteratorStreamer`` while ``generate`` runs in a worker thread. One model is kept loaded at a time
(the last one asked for), so a board over many runs holds one model's memory.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

_lock = threading.RLock()
_loaded: dict[str, Any] = {}  # {"key": (path, kind), "value": (model, tokenizer, extra)}


def _cached(run_dir: Path, kind: str, load) -> Any:
    key = (str(run_dir.resolve()), kind)
    with _lock:
        if _loaded.get("key") != key:
            _loaded.clear()  # free the previous model before loading the next
            _loaded["value"], _loaded["key"] = load(), key
        return _loaded["value"]


def _chat_model(run_dir: Path) -> tuple[Any, Any]:
    from tunelab.adapters.lora import merge_lora
    from tunelab.models.run import load_run, read_run_info

    if not (run_dir / "tunelab.json").is_file():
        raise TunelabError(f"{run_dir.name} is not finished (no tunelab.json yet): chat needs its final weights")
    if read_run_info(run_dir).get("task_type") == "SEQ_CLS":
        raise TunelabError(f"{run_dir.name} is a classifier or reward model, not a chat model: use Predict")

    def load():
        model, tokenizer, _ = load_run(run_dir)
        if not tokenizer.chat_template:
            raise TunelabError(f"{run_dir.name}: its tokenizer has no chat template, so a conversation cannot be "
                               "rendered (train with model.chat_template set)")
        merge_lora(model)
        return model, tokenizer

    return _cached(run_dir, "chat", load)


def stream_reply(run_dir: Path, history: list[dict[str, str]], *, system: str = "", max_new_tokens: int = 128,
                 temperature: float = 0.0) -> Iterator[str]:
    """The assistant's reply to ``history`` (``[{"role", "content"}, ...]``, ending with the user's turn),
    yielded as the text so far after each decoded piece; greedy when ``temperature`` is 0.

    Raises:
        TunelabError: the run is not finished, is a classifier, or has no chat template.
    """
    from transformers import TextIteratorStreamer

    from tunelab.models.generate import generate_replies

    model, tokenizer = _chat_model(run_dir)
    conversation = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": m["role"], "content": m["content"]} for m in history]
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
    failure: list[BaseException] = []

    def work() -> None:
        try:
            with _lock:  # one generation at a time per loaded model
                generate_replies(model, tokenizer, [conversation], max_new_tokens=max_new_tokens, streamer=streamer,
                                 do_sample=temperature > 0, temperature=temperature or 1.0)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(err)
            streamer.end()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text
    worker.join()
    if failure:
        raise failure[0]


def predict_text(run_dir: Path, text: str, text_pair: str | None = None) -> dict[str, Any]:
    """A classifier run's answer for one text (and its pair): ``{"prediction", "probabilities"}`` (regression:
    ``{"prediction"}``), as ``tunelab predict`` writes it.

    Raises:
        TunelabError: the run is not a finished classification run; the run expects a text pair and none
            was given.
    """
    from tunelab.data.classification import collate_classification, tokenize_records
    from tunelab.eval.classification import load_classification_run, prediction, predict_logits, probabilities

    model, tokenizer, config, labels = _cached(run_dir, "classify", lambda: load_classification_run(run_dir))
    cc = config.classification
    record = {cc.text_field: text}
    if cc.text_pair_field:
        if not text_pair:
            raise TunelabError(f"{run_dir.name} classifies text pairs ({cc.text_field}, {cc.text_pair_field}): "
                               "give the second text too")
        record[cc.text_pair_field] = text_pair
    examples, _ = tokenize_records([record], tokenizer, cc, None, max_seq_len=config.data.max_seq_len,
                                   overlong="truncate", where="board input")
    batch = collate_classification(examples, tokenizer.pad_token_id)
    with _lock:
        logits = predict_logits(model, [batch], next(model.parameters()).device)
    row = probabilities(labels.problem_type, logits)[0].tolist()
    return prediction(labels.problem_type, labels.names, row, cc.threshold)
