"""The preference config section: paper defaults, strict keys, cross-field checks."""

import pytest

from tunelab.config.load import validate_config
from tunelab.errors import ConfigError

BASE = {"model": {"name_or_path": "m"}, "data": {"train": {"path": "pairs.jsonl"}}}


def config(**extra):
    return validate_config({**BASE, **extra})


@pytest.mark.parametrize("loss, beta", [("dpo", 0.1), ("ipo", 0.1), ("hinge", 0.1), ("simpo", 2.0)])
def test_beta_defaults_follow_the_papers(loss, beta):
    pc = config(task="dpo", preference={"loss": loss}).preference
    assert pc.beta == beta and pc.gamma == 1.0 and pc.lam == 0.1 and pc.label_smoothing == 0.0


def test_defaults_filled_in_when_section_is_absent_and_explicit_beta_wins():
    assert config(task="dpo").preference.loss == "dpo"
    assert config(task="reward").preference.margin == 0.0
    assert config(task="dpo", preference={"loss": "simpo", "beta": 2.5}).preference.beta == 2.5


def test_reference_resolution():
    pc = config(task="dpo").preference
    assert pc.resolved_reference("lora") == "adapters_off" and pc.resolved_reference("full") == "precomputed"
    assert config(task="dpo", preference={"loss": "orpo"}).preference.resolved_reference("lora") == "none"


@pytest.mark.parametrize("extra, needle", [
    ({"task": "dpo", "preference": {"betta": 0.1}}, "preference.betta"),
    ({"task": "dpo", "preference": {"loss": "rso"}}, "preference.loss"),
    ({"task": "dpo", "preference": {"label_smoothing": 0.5}}, "preference.label_smoothing"),
    ({"task": "dpo", "preference": {"reference": "adapters_off"}, "train": {"method": "full"}}, "needs train.method=lora"),
    ({"task": "sft", "preference": {}}, "only by task=reward"),
    ({"task": "dpo", "data": {"train": {"path": "p.jsonl"}, "format": "alpaca"}}, "data.format"),
])
def test_bad_preference_configs_name_the_key(extra, needle):
    with pytest.raises(ConfigError) as err:
        config(**extra)
    assert needle in str(err.value)
