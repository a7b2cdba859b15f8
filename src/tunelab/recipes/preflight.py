"""Config checks that need the model's architecture but not its weights or the data.

The model skeleton is built from its ``config.json`` on the meta device (no memory, no weights
read, well under a second), so a ``lora.target_modules`` entry that names no linear layer is a
config error listing the model's linear-module names before data or weights load.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.adapters.lora import find_target_modules
from tunelab.config.schema import Config
from tunelab.models.loading import resolve_model_path
from tunelab.models.run import config_reference
from tunelab.training.trackers import check_reachable

SEQUENCE_TASKS = ("classification", "reward")


def check_before_loading(config: Config) -> None:
    """Check that an MLflow server in ``train.report_to`` answers, and ``lora.target_modules``
    against the model's architecture (``train.method: lora`` only).

    A model whose config cannot be read here (a hub id without network) is left to the loader.

    Raises:
        ConfigError: a target name or pattern matches no linear layer (the message lists the
            linear-module names); the MLflow server does not answer
            (:func:`tunelab.training.trackers.check_reachable`).
    """
    check_reachable(config.train.report_to)
    if config.train.method != "lora":
        return
    skeleton = model_skeleton(config)
    if skeleton is None:
        return
    heads = [name for name in ("score", "classifier") if config.task in SEQUENCE_TASKS and hasattr(skeleton, name)]
    find_target_modules(skeleton, config.lora.target_modules, exclude=heads)


def model_skeleton(config: Config) -> Any:
    """The model built from its config on the meta device, or None when its config is not readable."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    mc = config.model
    try:
        model_config = AutoConfig.from_pretrained(resolve_model_path(config_reference(mc.name_or_path)), revision=mc.revision,
                                                  trust_remote_code=mc.trust_remote_code)
    except (OSError, ValueError):
        return None
    auto = AutoModelForSequenceClassification if config.task in SEQUENCE_TASKS else AutoModelForCausalLM
    with torch.device("meta"):
        try:
            return auto.from_config(model_config, trust_remote_code=mc.trust_remote_code)
        except (ValueError, KeyError):
            return None
