"""Issue 14 rule 8: RL recipes launched by torchrun (WORLD_SIZE > 1) are refused with one clear message,
before anything is loaded or written."""

import pytest

from tunelab.config.load import validate_config
from tunelab.errors import TunelabError


@pytest.mark.parametrize("task", ["ppo", "grpo"])
def test_rl_recipes_refuse_several_processes_before_writing_anything(tmp_path, monkeypatch, task):
    import importlib

    train = importlib.import_module(f"tunelab.recipes.{task}").train
    rewards = [{"type": "exact_match"}]
    config = validate_config({
        "task": task, "output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(tmp_path / "no-model")},
        "data": {"train": {"path": "builtin:arithmetic", "name": "add", "split": "train"}},
        "train": {"max_steps": 1}, "rl": {"rewards": rewards}})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(TunelabError, match=rf"task={task} runs on one process only, but torchrun started 2"):
        train(config)
    assert not (tmp_path / "run").exists()
