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
