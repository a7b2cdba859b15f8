"""User-facing errors.

A :class:`TunelabError` is a problem with the user's input (config, data, paths). The CLI prints
its message without a traceback and exits with status 2. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class TunelabError(Exception):
    """Base class for errors caused by user input; the message says what to change."""


class ConfigError(TunelabError):
    """A config key is unknown, has a bad value, or a config file cannot be read."""


class DataError(TunelabError):
    """A data file or record is malformed, or filtering left nothing to train on."""


class ModelLoadError(TunelabError):
    """A model or adapter cannot be found or loaded as asked."""


class OutputError(TunelabError):
    """An output path cannot or may not be written: it holds other files, another run holds it, or
    the filesystem refused (full disk, read-only, no permission). The message names the path."""
