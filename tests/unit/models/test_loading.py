import pytest

from tunelab.errors import ModelLoadError
from tunelab.models.loading import ALIASES, load_tokenizer, resolve_model_path


def test_misspelled_alias_fails_at_once_with_the_closest_alias(monkeypatch):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("a name without '/' must not reach transformers / the hub")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer("smollm2-135m-instuct")
    message = str(err.value)
    assert "unknown model 'smollm2-135m-instuct'" in message
    assert "did you mean 'smollm2-135m-instruct'?" in message
    assert all(alias in message for alias in ALIASES)
    assert "openai-community/gpt2" in message


def test_unrelated_bare_name_lists_aliases_without_a_suggestion():
    with pytest.raises(ModelLoadError) as err:
        resolve_model_path("gpt2")
    assert "did you mean" not in str(err.value) and "owner/name" in str(err.value)


def test_hub_ids_and_existing_bare_local_paths_pass_through(tmp_path, monkeypatch):
    assert resolve_model_path("openai-community/gpt2") == "openai-community/gpt2"
    (tmp_path / "mymodel").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("mymodel") == "mymodel"


@pytest.mark.parametrize("name", ["./my-model", "models/x", "models/x/y", "../up/model", "a\\b", "./models/x"])
def test_a_missing_relative_model_path_fails_at_once_naming_the_working_directory(tmp_path, monkeypatch, name):
    """Issue 15 item 10: ``models/x`` with a local ``models/`` directory, or any path that cannot be a hub id,
    is looked up locally only; the old code sent ``models/x`` to the hub (over a minute of retries offline)."""
    import huggingface_hub
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("a local path must not reach transformers / the hub")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_hub)
    monkeypatch.setattr(huggingface_hub, "model_info", no_hub)
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer(name)
    message = str(err.value)
    assert f"model path {name} was not found relative to the working directory {tmp_path}" in message
    assert "the hub is not asked" in message


def test_an_uncached_hub_id_fails_within_seconds_when_the_hub_cannot_be_reached(tmp_path, monkeypatch):
    import time

    import huggingface_hub
    import transformers

    def unreachable(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    def no_transformers(*args, **kwargs):
        raise AssertionError("transformers would retry the hub for a minute")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_transformers)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_tokenizer("someone/not-cached-model")
    assert time.perf_counter() - started < 5
    message = str(err.value)
    assert f"no such local directory ({tmp_path / 'someone/not-cached-model'} relative to the working directory)" \
        in message and "the hub cannot be reached (" in message


def test_auto_attention_falls_back_to_eager_for_architectures_without_sdpa(tmp_path):
    """MPNet (the all-mpnet-base-v2 alias) has no SDPA attention in transformers; 'auto' must still load it."""
    from transformers import AutoModelForSequenceClassification, MPNetConfig, MPNetModel

    from tunelab.models.loading import load_model

    MPNetModel(MPNetConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2)).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), AutoModelForSequenceClassification, num_labels=3)
    assert model.config._attn_implementation == "eager"
