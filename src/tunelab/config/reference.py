"""The config reference (every key, its default and meaning), generated from the schema.

``tunelab config reference`` prints it; the README embeds it between markers and a test checks
that the README copy is current, so documentation cannot drift from the schema.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tunelab.config.load import _submodel
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
            sub = _submodel(field.annotation)
            if sub is not None:
                sections.append((key, sub))
            rows.append(f"| `{key}` | {_default(field)} | {_type(field.annotation)} | {field.description or ''} |")
        out.append(f"**`{prefix}`** {(section.__doc__ or '').strip().splitlines()[0]}\n\n"
                   "| key | default | type | meaning |\n|---|---|---|---|\n" + "\n".join(rows))
    return "\n\n".join(out) + "\n"


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
