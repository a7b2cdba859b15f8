from pathlib import Path

import pytest

from tunelab.config.load import dump_config, load_config
from tunelab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
MINIMAL = """
model: {name_or_path: smollm2-135m-instruct}
data: {train: {path: data.jsonl}}
"""


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config.model.name_or_path


def test_quickstart_config_checkpoints_during_the_run_so_ctrl_c_can_resume():
    """The README's quickstart (about 50 optimizer steps) must leave checkpoints to --resume from."""
    train = load_config(ROOT / "configs" / "sft" / "support-assistant-lora.yaml").train
    assert train.save_every is not None and train.save_every <= 10
    assert train.keep_last <= 2


def test_defaults_come_from_schema(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.train.method == "lora" and config.lora.r == 16 and config.data.packing is True


def test_dotted_overrides_parse_yaml_values(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["train.lr=1e-4", "lora.r=32", "lora.target_modules=[q_proj,v_proj]"])
    assert config.train.lr == 1e-4 and config.lora.r == 32 and config.lora.target_modules == ["q_proj", "v_proj"]


def test_unknown_key_names_path_and_suggests(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL + "train: {learning_rat: 0.1}\n"))
    assert "train.learning_rat" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), ["lora.rank=8"])
    assert "lora.rank" in str(err.value) and "did you mean 'lora.r'" in str(err.value)


def test_bad_value_names_key_and_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), ["train.schedule=exponential"])
    message = str(err.value)
    assert "train.schedule" in message and "cosine" in message


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(write(tmp_path, MINIMAL), ["train.lr"])


def test_dump_is_reloadable(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["train.lr=5e-5"])
    again = load_config(write(tmp_path, dump_config(config)))
    assert again == config


def test_train_compile_is_off_by_default_and_validated(tmp_path):
    assert load_config(write(tmp_path, MINIMAL)).train.compile is False
    assert load_config(write(tmp_path, MINIMAL), ["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), ["train.compile=fast"])
    assert "train.compile" in str(err.value)


def test_train_compile_is_refused_for_the_rl_tasks_that_do_not_use_it():
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "grpo" / "arithmetic-exact-match.yaml", ["train.compile=true"])
    assert "train.compile" in str(err.value) and "grpo" in str(err.value)
    assert "{'task'" not in str(err.value) and "Value error" not in str(err.value)  # the config is not echoed back


@pytest.mark.parametrize("override", ["rl.value_lr=inf", "rl.kl_coef=nan", "train.lr=inf", "train.max_grad_norm=nan"])
def test_non_finite_numbers_are_refused_naming_the_key(override):
    """A bound like lr > 0 accepts inf unless finiteness is required; inf lr trained a NaN model before."""
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.") + ": Input should be a finite"):
        load_config(ROOT / "configs" / "ppo" / "drug-review-ppo.yaml", [override])
