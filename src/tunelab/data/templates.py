"""Render canonical examples to text and find which characters are supervised.

Works with stock chat templates that have no ``{% generation %}`` markers. The reply of assistant
turn ``i`` is located by rendering the conversation up to turn ``i`` with
``add_generation_prompt=True`` (the prompt the model is served) and up to and including turn ``i``;
the reply is the difference. Where that prompt is not a prefix (a template that writes a default
system prompt only before a first user turn, or refuses an empty conversation) the reply's text
is found in the rendering instead, and that reply is trained after the prompt the template renders
when serving it. The span keeps the end-of-turn token (e.g. ``<|im_end|>``,
``<end_of_turn>``, ``<|eot_id|>``) and drops whitespace the template puts after it, so the model
learns to stop. Every assistant turn is supervised, a conversation's opening one too.

A template is *prefix-stable* when rendering more turns never changes the text of earlier ones.
Templates that are not (reasoning templates that strip earlier replies' ``<think>`` blocks, a
template that writes the date into the last user turn) are handled per conversation, detected by
rendering each prefix and comparing: ``supervise: last_turn`` renders the whole conversation once
(the last reply is its end); ``supervise: assistant`` turns each reply into its own example, with
the context the template renders when that reply is generated. :class:`Rendering.per_reply` says
which was done.

Data the loss cannot use raises :class:`UnusableExample` with the reason it is counted under.
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


class UnusableExample(DataError):
    """An example the loss cannot use; ``reason`` is the name its drop is counted under."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Rendered:
    """Text of one example and the half-open character spans ``[start, end)`` that are supervised.

    ``templated``: the text was written by a chat template (which then decides the special tokens,
    see :mod:`tunelab.data.encoding`). ``replies``: the spans that are assistant replies (ending with
    the end-of-turn marker); empty for raw text and ``supervise: all``.
    """

    text: str
    spans: tuple[tuple[int, int], ...]
    templated: bool = False
    replies: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Rendering:
    """The examples one canonical example becomes: one, or (``per_reply``) one per assistant reply."""

    examples: tuple[Rendered, ...]
    per_reply: bool = False


def resolve_chat_template(tokenizer: Any, chat_template: str | None, system_prompt: str = "default") -> None:
    """Install ``chat_template`` (a name, a .jinja path or inline Jinja) on the tokenizer, if given,
    then apply ``system_prompt`` to the installed template (see :mod:`tunelab.data.system_prompt`).

    The template is changed on the tokenizer, which every run saves: training, chat, sample answers,
    RL prompts and other tools that read the saved tokenizer all render the same text. A template
    installed here on a tokenizer that adds BOS by itself gets ``{{ bos_token }}`` in front when it
    writes none, so the BOS the model was pre-trained with stays (see :mod:`tunelab.data.encoding`).

    Raises:
        DataError: a .jinja file that does not exist; a ``system_prompt`` that cannot be applied.
    """
    from tunelab.data.system_prompt import apply_system_prompt

    if chat_template is not None:
        if chat_template in NAMED_TEMPLATES:
            tokenizer.chat_template = NAMED_TEMPLATES[chat_template]
        elif chat_template.endswith(".jinja"):
            path = Path(chat_template)
            if not path.is_file():
                raise DataError(f"model.chat_template: file not found: {path}")
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        else:
            tokenizer.chat_template = chat_template
        _keep_bos(tokenizer)
    if tokenizer.chat_template:
        tokenizer.chat_template = apply_system_prompt(tokenizer, tokenizer.chat_template, system_prompt)


def _keep_bos(tokenizer: Any) -> None:
    bos = tokenizer.bos_token
    if bos is None or tokenizer("a", add_special_tokens=True).input_ids[:1] != [tokenizer.bos_token_id]:
        return
    if not apply_template(tokenizer, [{"role": "user", "content": "a"}], False).startswith(bos):
        tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template


def render(tokenizer: Any, example: dict[str, Any], supervise: str) -> Rendering:
    """Render a canonical example (see :mod:`tunelab.data.formats`) with supervised spans.

    Args:
        supervise: ``assistant`` (every reply), ``last_turn`` (the final reply) or ``all``.

    Raises:
        UnusableExample: empty text, completion or assistant reply; no assistant reply; a
            conversation that ends with a user (or system) turn; a reply that cannot be located.
        DataError: a conversation needs a chat template and the tokenizer has none.
    """
    eos = tokenizer.eos_token or ""
    if "text" in example:
        if not example["text"].strip():
            raise UnusableExample("empty text")
        text = example["text"] + eos
        return Rendering((Rendered(text, ((0, len(text)),)),))
    if "prompt" in example and not tokenizer.chat_template:
        if not example["completion"].strip():
            raise UnusableExample("empty completion")
        text = example["prompt"] + example["completion"] + eos
        reply = (len(example["prompt"]), len(text))
        return Rendering((Rendered(text, ((0, len(text)),) if supervise == "all" else (reply,), False, (reply,)),))
    messages = example.get("messages") or [
        {"role": "user", "content": example["prompt"]},
        {"role": "assistant", "content": example["completion"]},
    ]
    return render_messages(tokenizer, messages, supervise)


def render_messages(tokenizer: Any, messages: list[dict[str, str]], supervise: str) -> Rendering:
    """Render a conversation with the tokenizer's chat template; spans cover assistant replies.

    Raises:
        UnusableExample / DataError: see :func:`render`.
    """
    if not tokenizer.chat_template:
        raise DataError(
            "the tokenizer has no chat template, so conversations cannot be rendered; "
            "set model.chat_template (e.g. 'chatml') or use the 'text' format"
        )
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if any(not messages[i]["content"].strip() for i in replies):
        raise UnusableExample("empty assistant reply")
    full = apply_template(tokenizer, messages, add_generation_prompt=False)
    if supervise == "all":  # every token is learned: a conversation without a reply is still text
        return Rendering((Rendered(full, ((0, len(full)),), True),))
    if not replies:
        raise UnusableExample("no assistant reply")
    if messages[-1]["role"] != "assistant":
        raise UnusableExample(f"conversation ends with a {messages[-1]['role']} turn")
    located = [locate_reply(tokenizer, messages, i) for i in (replies[-1:] if supervise == "last_turn" else replies)]
    if all(as_served and full.startswith(text) for text, _, as_served in located):
        spans = tuple(span for _, span, _ in located)
        return Rendering((Rendered(full, spans, True, spans),))
    return Rendering(tuple(Rendered(text, (span,), True, (span,)) for text, span, _ in located),
                     per_reply=len(located) > 1)


def locate_reply(tokenizer: Any, messages: list[dict[str, str]], i: int) -> tuple[str, tuple[int, int], bool]:
    """A text that ends with assistant turn ``i``, the character span of that reply in it, and
    whether the text is the conversation's own rendering up to turn ``i`` (else: the prompt the
    template renders to generate turn ``i``, followed by the reply as the template renders it).

    The span starts where the generation prompt for ``messages[:i]`` ends (or, where the template
    refuses that prompt, where the reply's text starts) and ends after the end-of-turn marker.

    Raises:
        UnusableExample: the reply's text is not in the rendering (a template that rewrites it).
    """
    upto = apply_template(tokenizer, messages[: i + 1], add_generation_prompt=False)
    end = len(upto.rstrip())
    try:
        prompt = apply_template(tokenizer, messages[:i], add_generation_prompt=True)
    except Exception:  # a template that refuses this prefix (e.g. an empty one): no serving context to match
        prompt = None
    if prompt is not None and upto.startswith(prompt) and end > len(prompt):
        return upto, (len(prompt), end), True
    content = messages[i]["content"].strip()
    start = upto.rfind(content)
    if start < 0 or not content:
        raise UnusableExample("reply text not found in the rendered conversation")
    if prompt is None:
        return upto, (start, end), True
    return prompt + upto[start:end], (len(prompt), len(prompt) + end - start), False


def apply_template(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template's text for ``messages`` (no tokenization)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
