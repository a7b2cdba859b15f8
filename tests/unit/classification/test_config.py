"""The classification config section: strictness, cross-field checks, shipped configs."""

from pathlib import Path

import pytest

from tunelab.config.load import load_config, validate_config
from tunelab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]


def raw(train=None, **classification):
    return {"task": "classification", "model": {"name_or_path": "m"}, "data": {"train": {"path": "d.jsonl"}},
            "classification": classification, "train": train or {}}


def test_defaults_and_task_pairing():
    config = validate_config(raw())
    cc = config.classification
    assert (cc.text_field, cc.label_field, cc.problem_type) == ("text", "label", "single_label")
    assert config.train.metric_for_best is None
    with pytest.raises(ConfigError, match="needs a 'classification' section"):
        validate_config({**raw(), "classification": None})
    with pytest.raises(ConfigError, match="needs a 'classification' section"):
        validate_config({**raw(), "task": "sft"})


@pytest.mark.parametrize("section, message", [
    ({"text_feild": "x"}, "unknown key 'classification.text_feild' \\(did you mean 'classification.text_field'"),
    ({"train": {"metric_for_best": "mse"}}, r"'mse' is not reported by task=classification \(problem_type single_label"),
    ({"metric_for_best": "accuracy"}, "classification.metric_for_best is now train.metric_for_best"),
    ({"problem_type": "regression", "train": {"metric_for_best": "mse"}, "class_weights": "balanced"}, "not regression"),
    ({"labels": ["a", "a"]}, "distinct"),
    ({"labels": ["a", "b"], "class_weights": [1.0]}, "1 entries for 2 labels"),
    ({"class_weights": "auto"}, "class_weights"),
    ({"threshold": 1.5}, "threshold"),
])
def test_bad_values_are_named(section, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(raw(**section))


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "classify").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = load_config(path)
    assert config.task == "classification" and config.train.threads == 2
    assert config.train.metric_for_best == "macro_f1"
