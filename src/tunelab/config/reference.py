"""The config reference (every key, its default and meaning), generated from the schema.

``tunelab config reference`` prints it; the README embeds it between markers and a test checks
that the README copy is current, so documentation cannot drift from the schema.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tunelab.config.schema import Config

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def config_reference_markdown(model: type[BaseModel] = Config) -> str:
    """One markdown table per config section, in schema order."""
    sections: list[tuple[str, type[BaseModel]]] = [("(top level)", model)]
    out = []
    while sections:
        prefix, section = sections.pop(0)
        rows = []
        for name, field in section.model_fields.items():
            key = name if prefix == "(top level)" else f"{prefix}.{name}"
            subs = _submodels(field.annotation)
            if len(subs) > 1:  # a discriminated union (e.g. rl.rewards): one table per variant
                tags = [_tag(sub) for sub in subs]
                sections.extend((f"{key}[type={tag}]", sub) for tag, sub in zip(tags, subs))
                kind = "list of" if str(field.annotation).startswith("list[") else "one of"
                type_text = f"{kind} {', '.join(tags)} (`type` picks one; tables below)"
            else:
                if subs:
                    sections.append((key, subs[0]))
                type_text = _type(field.annotation)
            rows.append(f"| `{key}` | {_default(field)} | {type_text} | {field.description or ''} |")
        out.append(f"**`{prefix}`** {(section.__doc__ or '').strip().splitlines()[0]}\n\n"
                   "| key | default | type | meaning |\n|---|---|---|---|\n" + "\n".join(rows))
    return "\n\n".join(out) + "\n"


def _submodels(annotation: Any) -> list[type[BaseModel]]:
    """Every config section class inside ``annotation`` (several for a union of sections)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in getattr(annotation, "__args__", ()):
        found += [sub for sub in _submodels(arg) if sub not in found]
    return found


def _tag(section: type[BaseModel]) -> str:
    """A union variant's ``type`` literal (e.g. ``exact_match``), else its class name."""
    field = section.model_fields.get("type")
    args = getattr(field.annotation, "__args__", ()) if field is not None else ()
    return str(args[0]) if args else section.__name__


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
    else:
        value = field.default
    if value is PydanticUndefined:
        return ""
    return f"`{json.dumps(value)}`"


def _type(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("tunelab.config.", "").replace("<class '", "").replace("'>", "")
    return text.replace("|", "\\|")
