"""Render canonical examples to text and find which characters are supervised.

Works with stock chat templates that have no ``{% generation %}`` markers: the span of assistant
turn ``i`` is found by rendering the conversation up to turn ``i`` with
``add_generation_prompt=True`` (the prompt the model sees) and up to and including turn ``i``;
the reply is the difference. The span keeps the end-of-turn token (e.g. ``<|im_end|>``) and drops
whitespace the template puts after it, so the model learns to stop. A template that re-renders
earlier turns differently once later turns exist (not prefix-stable) is rejected with an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}


@dataclass(frozen=True)
class Rendered:
    """Text of one example and the half-open character spans ``[start, end)`` that are supervised."""

    text: str
    spans: tuple[tuple[int, int], ...]


def resolve_chat_template(tokenizer: Any, chat_template: str | None) -> None:
    """Install ``chat_template`` (a name, a .jinja path or inline Jinja) on the tokenizer, if given."""
    if chat_template is None:
        return
    if chat_template in NAMED_TEMPLATES:
        tokenizer.chat_template = NAMED_TEMPLATES[chat_template]
    elif chat_template.endswith(".jinja"):
        path = Path(chat_template)
        if not path.is_file():
            raise DataError(f"model.chat_template: file not found: {path}")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    else:
        tokenizer.chat_template = chat_template


def render(tokenizer: Any, example: dict[str, Any], supervise: str) -> Rendered:
    """Render a canonical example (see :mod:`tunelab.data.formats`) with supervised spans.

    Args:
        supervise: ``assistant`` (every reply), ``last_turn`` (the final reply) or ``all``.

    Raises:
        DataError: a conversation needs a chat template and the tokenizer has none, or the
            template is not prefix-stable.
    """
    if "text" in example:
        text = example["text"] + (tokenizer.eos_token or "")
        return Rendered(text, ((0, len(text)),))
    if "prompt" in example and not tokenizer.chat_template:
        text = example["prompt"] + example["completion"] + (tokenizer.eos_token or "")
        start = 0 if supervise == "all" else len(example["prompt"])
        return Rendered(text, ((start, len(text)),))
    messages = example.get("messages") or [
        {"role": "user", "content": example["prompt"]},
        {"role": "assistant", "content": example["completion"]},
    ]
    return render_messages(tokenizer, messages, supervise)


def render_messages(tokenizer: Any, messages: list[dict[str, str]], supervise: str) -> Rendered:
    """Render a conversation with the tokenizer's chat template; spans cover assistant replies."""
    if not tokenizer.chat_template:
        raise DataError(
            "the tokenizer has no chat template, so conversations cannot be rendered; "
            "set model.chat_template (e.g. 'chatml') or use the 'text' format"
        )
    full = _apply(tokenizer, messages, add_generation_prompt=False)
    if supervise == "all":
        return Rendered(full, ((0, len(full)),))
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i == 0:
            continue
        prompt = _apply(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _apply(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise DataError(
                "the chat template is not prefix-stable (rendering more turns changes earlier text), "
                "so reply spans cannot be located; set model.chat_template to a template that is"
            )
        end = len(upto.rstrip())
        if end > len(prompt):
            spans.append((len(prompt), end))
    if supervise == "last_turn":
        spans = spans[-1:]
    return Rendered(full, tuple(spans))


def _apply(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
