"""``data.system_prompt``: what system prompt a conversation without one gets, in the template itself.

Some chat templates write a default system prompt into every conversation that has none (SmolLM2:
"You are a helpful AI assistant named SmolLM, trained by Hugging Face"; Qwen2.5 likewise), so every
training example carries it. The option:
  * ``default``: the template as it is (its default system prompt, if it has one);
  * ``none``: no system prompt unless the conversation has one: the template's default is removed
    (the output expression that writes it is taken out of the template's source);
  * any other text: that system prompt for every conversation without one.

The change is made to the chat template, not to the data, so training, chat, sample answers,
RL prompts, preference data and any server that reads the run's saved tokenizer render the
same text.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tunelab.errors import DataError

SENTINEL = "TUNELABSYSTEMSENTINEL"
_OUTPUT = re.compile(r"\{\{-?.*?-?\}\}", re.DOTALL)


def apply_system_prompt(tokenizer: Any, template: str, system_prompt: str) -> str:
    """``template`` changed as ``system_prompt`` says (``default`` | ``none`` | text).

    Raises:
        DataError: ``none`` on a template whose default system prompt cannot be found in its source.
    """
    if system_prompt == "default":
        return template
    if system_prompt == "none":
        return _without_default(tokenizer, template)
    literal = json.dumps(system_prompt)
    return ("{%- if not messages or messages[0]['role'] != 'system' %}{%- set messages = "
            f"[{{'role': 'system', 'content': {literal}}}] + messages %}}{{%- endif %}}" + template)


def default_system_prompt(tokenizer: Any, template: str) -> str | None:
    """The text ``template`` writes as system prompt into a conversation that has none, or None."""
    user = [{"role": "user", "content": "hi"}]
    plain = _render(tokenizer, template, user)
    with_system = _render(tokenizer, template, [{"role": "system", "content": SENTINEL}, *user])
    if SENTINEL not in with_system:
        return None
    head, tail = with_system.split(SENTINEL, 1)
    if not (plain.startswith(head) and plain.endswith(tail)) or len(plain) <= len(head) + len(tail):
        return None
    return plain[len(head): len(plain) - len(tail)]


def _without_default(tokenizer: Any, template: str) -> str:
    default = default_system_prompt(tokenizer, template)
    if default is None:
        return template
    forms = {default, json.dumps(default)[1:-1], default.replace("\n", "\\n")}
    out = _OUTPUT.sub(lambda m: "" if any(f in m.group(0) for f in forms) else m.group(0), template)
    if out == template or default in _render(tokenizer, out, [{"role": "user", "content": "hi"}]):
        raise DataError(f"data.system_prompt: none: cannot find where the chat template writes its default system "
                        f"prompt ({default[:60]!r}); set model.chat_template to a template without one, or give "
                        "data.system_prompt a text of your own")
    return out


def _render(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
