"""The rl config section (strict, discriminated rewards, cross-checks) and builtin:arithmetic."""

import re

import pytest

from tunelab.config.load import validate_config
from tunelab.data.builtin import load_builtin
from tunelab.errors import ConfigError, DataError

BASE = {"model": {"name_or_path": "x"}, "data": {"train": {"path": "x"}}}


def test_rl_section_is_strict_and_checked_against_task():
    ok = validate_config({**BASE, "task": "grpo", "rl": {"rewards": [{"type": "regex", "pattern": "x"}]}})
    assert ok.rl.num_generations == 4 and ok.rl.scale_rewards == "group"
    bad = [
        ({"task": "grpo", "rl": {"rewards": [{"type": "regex", "patern": "x"}]}}, "unknown key 'rl.rewards.0.regex.patern'"),
        ({"task": "grpo", "rl": {"rewards": [{"type": "bleu"}]}}, "does not match any of the expected tags"),
        ({"task": "grpo", "rl": {"rewards": []}}, "needs rl.rewards"),
        ({"task": "ppo"}, "needs rl.rewards"),
        ({"task": "grpo", "rl": {"num_generations": 1, "rewards": [{"type": "exact_match"}]}}, "num_generations >= 2"),
        ({"task": "sft", "rl": {"rewards": [{"type": "exact_match"}]}}, "read only by task=ppo and task=grpo"),
        ({"task": "grpo", "rl": {"rewards": [{"type": "exact_match", "extract": "regex"}]}}, "needs a `pattern`"),
        ({"task": "ppo", "rl": {"kl_estimator": "k4", "rewards": [{"type": "exact_match"}]}}, "rl.kl_estimator"),
        ({"task": "grpo", "rl": {"scale_rewards": "mad", "rewards": [{"type": "exact_match"}]}}, "rl.scale_rewards"),
    ]
    for raw, needle in bad:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            validate_config({**BASE, **raw})


def test_kl_estimator_and_reward_scaling_keys():
    """Issue 14 items 11-12: k1/k2/k3/abs selectable ('auto' = k1 for ppo, k3 for grpo); scale_rewards
    group/batch/none ('std' = old name of group). Old code rejected k2/abs and 'batch'."""
    rewards = {"rewards": [{"type": "exact_match"}]}
    for task, auto in (("ppo", "k1"), ("grpo", "k3")):
        assert validate_config({**BASE, "task": task, "rl": rewards}).rl.resolved_kl_estimator(task) == auto
        for name in ("k1", "k2", "k3", "abs"):
            rl = validate_config({**BASE, "task": task, "rl": {**rewards, "kl_estimator": name}}).rl
            assert rl.resolved_kl_estimator(task) == name
    for scale, stored in (("group", "group"), ("batch", "batch"), ("none", "none"), ("std", "group")):
        assert validate_config({**BASE, "task": "grpo", "rl": {**rewards, "scale_rewards": scale}}).rl.scale_rewards \
            == stored


def test_arithmetic_is_deterministic_correct_and_held_out_is_disjoint():
    train = load_builtin("arithmetic", "add,sub,mul", "train")
    assert train == load_builtin("arithmetic", "add,sub,mul", "train") and len(train) == 2000
    validation = load_builtin("arithmetic", "add,sub,mul", "validation")
    assert 150 < len(validation) <= 200
    assert not {r["prompt"] for r in validation} & {r["prompt"] for r in train}
    for record in train[:300]:
        a, b = map(int, re.findall(r"\d+", record["prompt"])[:2])
        expected = {"add": a + b, "sub": a - b, "mul": a * b}[record["operation"]]
        assert record["answer"] == str(expected) and expected >= 0
    with pytest.raises(DataError, match="unknown operation"):
        load_builtin("arithmetic", "div", "train")
    with pytest.raises(DataError, match="splits"):
        load_builtin("arithmetic", None, "test")
