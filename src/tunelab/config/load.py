"""Read a YAML config, apply ``a.b.c=value`` overrides, validate against the schema.

Every error names the file and the key path; an unknown key comes with the closest valid key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tunelab.config.schema import Config
from tunelab.errors import ConfigError


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load and validate a run config.

    Args:
        path: YAML file.
        overrides: ``key.path=value`` strings; values are parsed as YAML scalars/lists
            (``train.lr=1e-4``, ``lora.target_modules=[q_proj,v_proj]``).

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: file missing or not YAML, an override without ``=``, an unknown key
            (with a suggestion), or a value the schema rejects (with the allowed values).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    for item in overrides:
        _apply_override(raw, item)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a plain dict as a :class:`Config`; raises :class:`ConfigError` naming the key path."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def dump_config(config: BaseModel) -> str:
    """The fully resolved config (defaults filled in) as YAML text."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value (e.g. train.lr=1e-4)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        node[parts[-1]] = value


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc) or "<top level>"
        if e["type"] == "extra_forbidden":
            hint = _suggest(loc)
            lines.append(f"  unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else ""))
        elif e["type"] == "missing":
            lines.append(f"  missing required key '{key}'")
        elif isinstance(e.get("input"), dict):  # a check across keys: its message names them; the section is not echoed
            lines.append(f"  {'.'.join(loc) + ': ' if loc else ''}{e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


# Names users bring from other tools (transformers TrainingArguments, PEFT, TRL) → ours.
KNOWN_ALIASES = {
    "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "learning_rate": "lr",
    "num_epochs": "epochs", "num_train_epochs": "epochs", "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size", "max_length": "max_seq_len", "max_seq_length": "max_seq_len",
    "model_name_or_path": "name_or_path", "lr_scheduler_type": "schedule", "warmup": "warmup_steps",
}


def _suggest(loc: list[str]) -> str | None:
    """Closest valid key path for an unknown key at ``loc``."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model else None
        model = _submodel(field.annotation) if field else None
        if model is None:
            return None
    alias = KNOWN_ALIASES.get(loc[-1])
    if alias in model.model_fields:
        return ".".join([*loc[:-1], alias])
    match = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.5)
    return ".".join([*loc[:-1], match[0]]) if match else None


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _submodel(arg)
        if found is not None:
            return found
    return None
