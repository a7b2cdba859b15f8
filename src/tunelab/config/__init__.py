"""Config schema (pydantic, strict) and loading (YAML + dotted overrides)."""

from tunelab.config.load import dump_config, load_config
from tunelab.config.schema import Config

__all__ = ["Config", "dump_config", "load_config"]
