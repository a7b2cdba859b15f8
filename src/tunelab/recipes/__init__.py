"""Recipes: each a flat ``train(config, *, resume, overwrite, console) -> result`` function.

``config.task`` picks the recipe module from :data:`RECIPES`; modules are imported lazily so a
command only pays for what it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

RECIPES: dict[str, str] = {
    "sft": "tunelab.recipes.sft",
    "reward": "tunelab.recipes.reward",
    "dpo": "tunelab.recipes.dpo",
    "grpo": "tunelab.recipes.grpo",
    "ppo": "tunelab.recipes.ppo",
    "classification": "tunelab.recipes.classify",
}


def get_recipe(task: str) -> Callable[..., dict[str, Any]]:
    """The ``train`` function of the recipe for ``task``, preceded by the checks that need no data or
    weights (:func:`tunelab.recipes.preflight.check_before_loading`), so a bad ``lora.target_modules``
    fails in seconds instead of after data and model loading."""
    from tunelab.recipes.preflight import check_before_loading

    train = importlib.import_module(RECIPES[task]).train

    def checked_train(config: Any, **kwargs: Any) -> dict[str, Any]:
        check_before_loading(config)
        return train(config, **kwargs)

    return checked_train
