"""An Ollama ``Modelfile`` for an exported GGUF: FROM, TEMPLATE, SYSTEM and stop parameters.

Ollama does not run Jinja; its ``TEMPLATE`` is a Go template over ``.Messages``. The Go template is
derived from the model's own chat template by rendering a conversation with marker contents and
cutting the text around them at the end-of-turn token: each role gets the text before its content
(``<|im_start|>user\\n``) and after it (``<|im_end|>\\n``), plus the generation prompt. The result
is checked by rebuilding the rendered conversation from those pieces; a template whose turns cannot
be cut that way (one that merges the system message into the first user turn, for example) is
refused rather than approximated.

The default system message is the run's ``data.system_prompt`` if it trained with one, else the
one the chat template inserts when a conversation has none (SmolLM2's does), else none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.errors import TunelabError
from tunelab.export.tokenizer_gguf import end_of_turn_token

_MARK = {role: f"\x02{role.upper()}\x03" for role in ("system", "user", "assistant", "user2")}


@dataclass(frozen=True)
class TurnFormat:
    """Text before and after each role's content, and the prompt that opens the assistant's reply."""

    prefix: dict[str, str]
    suffix: dict[str, str]
    generation_prompt: str
    default_system: str | None
    start: str = ""  # text before the first message: the BOS text, unless llama.cpp adds BOS itself


def turn_format(tokenizer: Any) -> TurnFormat:
    """Cut the tokenizer's chat template into per-role prefix/suffix pieces (see module docstring).

    Raises:
        TunelabError: no chat template, no end-of-turn token, or turns that do not split cleanly.
    """
    eot = end_of_turn_token(tokenizer)
    if eot is None:
        raise TunelabError("--ollama needs a chat template whose assistant turns end with a special token "
                           "(e.g. <|im_end|>); this tokenizer has none")
    m = _MARK
    convo = [{"role": "system", "content": m["system"]}, {"role": "user", "content": m["user"]},
             {"role": "assistant", "content": m["assistant"]}, {"role": "user", "content": m["user2"]}]
    text = _render(tokenizer, convo, True)
    head, rest = _split_once(text, m["system"])
    gap_su, rest = _split_once(rest, m["user"])
    gap_ua, rest = _split_once(rest, m["assistant"])
    gap_au, tail = _split_once(rest, m["user2"])
    bos, start = tokenizer.bos_token or "", ""
    if bos and head.startswith(bos):
        head, start = head[len(bos):], "" if _adds_bos(tokenizer) else bos  # else llama.cpp adds BOS itself
    suffix_s, prefix_u = _cut(gap_su, eot)
    suffix_u, prefix_a = _cut(gap_ua, eot)
    suffix_a, prefix_u2 = _cut(gap_au, eot)
    if not tail.startswith(suffix_u) or prefix_u2 != prefix_u:
        raise TunelabError("the chat template renders turns differently by position; no Ollama template derived")
    fmt = TurnFormat({"system": head, "user": prefix_u, "assistant": prefix_a},
                     {"system": suffix_s, "user": suffix_u, "assistant": suffix_a},
                     tail[len(suffix_u):], None, start)
    check = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
             {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    if _strip_bos(_render(tokenizer, check, True), tokenizer) != render_turns(fmt, check):
        raise TunelabError("the chat template's turns do not split into role prefixes and suffixes; "
                           "no Ollama template derived")
    return TurnFormat(fmt.prefix, fmt.suffix, fmt.generation_prompt, _default_system(tokenizer, fmt), start)


def render_turns(fmt: TurnFormat, messages: list[dict[str, str]]) -> str:
    """What the derived Go template renders for ``messages`` (the same concatenation, in Python)."""
    text = "".join(fmt.prefix[m["role"]] + m["content"] + fmt.suffix[m["role"]] for m in messages)
    return fmt.start + text + fmt.generation_prompt


def go_template(fmt: TurnFormat) -> str:
    """The Ollama ``TEMPLATE`` body: one branch per role over ``.Messages``, then the generation prompt."""
    def lit(s: str) -> str:
        if "{{" in s or '"""' in s:
            raise TunelabError(f"chat template piece {s!r} cannot be written into a Modelfile template")
        return s

    branches = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}'
                       f"{lit(fmt.prefix[role])}{{{{ .Content }}}}{lit(fmt.suffix[role])}"
                       for i, role in enumerate(("system", "user", "assistant")))
    return f"{lit(fmt.start)}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{lit(fmt.generation_prompt)}"


def modelfile(gguf_name: str, tokenizer: Any, system_prompt: str | None = None) -> str:
    """Modelfile text: ``FROM ./<gguf_name>``, TEMPLATE, SYSTEM (if any), a stop per end-of-turn token."""
    fmt = turn_format(tokenizer)
    system = system_prompt if system_prompt is not None else fmt.default_system
    stops = dict.fromkeys(t for t in (end_of_turn_token(tokenizer), tokenizer.eos_token) if t)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(fmt)}"""']
    if system:
        if '"""' in system:
            raise TunelabError('the system prompt contains """ and cannot be written into a Modelfile')
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"


def _cut(gap: str, eot: str) -> tuple[str, str]:
    """Split the text between two contents after the end-of-turn token and the whitespace after it."""
    at = gap.find(eot)
    if at < 0:
        raise TunelabError(f"the chat template puts no {eot} between turns; no Ollama template derived")
    end = at + len(eot)
    while end < len(gap) and gap[end] in " \n":
        end += 1
    return gap[:end], gap[end:]


def _default_system(tokenizer: Any, fmt: TurnFormat) -> str | None:
    """The system message the template inserts into a conversation without one, if any."""
    text = _render(tokenizer, [{"role": "user", "content": _MARK["user"]}], True)
    head = text[: text.index(_MARK["user"])]
    bos = tokenizer.bos_token or ""
    head = head[len(bos):] if bos and head.startswith(bos) else head
    if head == fmt.prefix["user"]:
        return None
    start, end = fmt.prefix["system"], fmt.suffix["system"] + fmt.prefix["user"]
    if head.startswith(start) and head.endswith(end):
        return head[len(start): len(head) - len(end)]
    raise TunelabError("the chat template adds text before the first user turn that is not a system turn")


def _split_once(text: str, mark: str) -> tuple[str, str]:
    parts = text.split(mark)
    if len(parts) != 2:
        raise TunelabError("the chat template does not write each message once, in its own turn "
                           "(e.g. it folds the system message into a user turn); no Ollama template derived")
    return parts[0], parts[1]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # a template's own raise_exception / jinja errors
        raise TunelabError(f"the chat template fails on a system/user/assistant conversation ({err}); "
                           "no Ollama template derived") from err


def _adds_bos(tokenizer: Any) -> bool:
    return tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]


def _strip_bos(text: str, tokenizer: Any) -> str:
    bos = tokenizer.bos_token or ""
    return text[len(bos):] if bos and _adds_bos(tokenizer) and text.startswith(bos) else text
