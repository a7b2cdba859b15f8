"""Issue 13 items 11 and 12: label names survive every path; a PEFT folder without tokenizer files
loads with its base model's tokenizer."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from tests.artifact_fixtures import bpe_tokenizer, make_tiny_qwen2, word_tokenizer
from tests.conftest import make_tiny_llama
from tunelab.adapters.lora import inject_lora, lora_layers
from tunelab.models.loading import load_tokenizer
from tunelab.models.run import label_maps, load_run, read_run_info, save_run

peft = pytest.importorskip("peft")
NAMES = ["negative", "neutral", "positive"]


@pytest.mark.parametrize("family", ["llama-word", "qwen2-bpe"])
def test_peft_folder_without_tokenizer_loads_with_the_base_tokenizer(tmp_path, family):
    tok = word_tokenizer() if family == "llama-word" else bpe_tokenizer()
    make = make_tiny_llama if family == "llama-word" else make_tiny_qwen2
    base = make(vocab_size=len(tok))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    adapted = peft.get_peft_model(make(vocab_size=len(tok)), peft.LoraConfig(r=2, lora_alpha=4,
                                                                           target_modules=["q_proj"]))
    adapted.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    adapted.save_pretrained(tmp_path / "adapter")  # adapter files only
    model, loaded, info = load_run(tmp_path / "adapter")
    assert info["method"] == "lora" and len(list(lora_layers(model))) == 2
    expected = load_tokenizer(str(tmp_path / "base"))
    assert loaded.get_vocab() == expected.get_vocab() and loaded.chat_template == tok.chat_template


def _classifier_run(tmp_path):
    tok = word_tokenizer()
    make_tiny_llama(vocab_size=len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    maps = {"id2label": dict(enumerate(NAMES)), "label2id": {n: i for i, n in enumerate(NAMES)}}
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3, **maps)
    model.config.pad_token_id = tok.pad_token_id
    inject_lora(model, ["q_proj", "v_proj"], r=2, alpha=4, exclude=["score"])
    torch.manual_seed(0)
    model.score.weight.data.normal_()
    save_run(tmp_path / "run", model, tok, method="lora", base_model=str(tmp_path / "base"), config_yaml="",
             results={"label_space": {"problem_type": "single_label", "names": NAMES}}, task_type="SEQ_CLS",
             modules_to_save=["score"])
    return tok


def test_label_names_survive_load_run_merge_peft_and_pipeline(tmp_path):
    from transformers import pipeline
    from typer.testing import CliRunner

    from tunelab.cli.app import app

    tok = _classifier_run(tmp_path)
    ours, _, info = load_run(tmp_path / "run")
    assert ours.config.id2label == dict(enumerate(NAMES))
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "run"), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert AutoConfig.from_pretrained(tmp_path / "merged").id2label == dict(enumerate(NAMES))
    classify = pipeline("text-classification", model=str(tmp_path / "merged"), tokenizer=tok, top_k=None)
    assert sorted(row["label"] for row in classify(["hello world"])[0]) == sorted(NAMES)
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3,
                                                              **label_maps(read_run_info(tmp_path / "run")))
    reference = peft.PeftModel.from_pretrained(base, tmp_path / "run").eval()
    assert reference.config.id2label == dict(enumerate(NAMES))
    ids = tok("hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(reference(ids).logits, ours(ids).logits, atol=1e-5)
