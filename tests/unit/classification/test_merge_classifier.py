"""`tunelab merge` of a LoRA classifier says which transformers class loads it and warns about mean pooling.

It printed "loads with AutoModelForCausalLM" for a sequence classifier (breaker, issue 18); fails on the
old code.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tests.unit.classification.helpers import tiny_classifier
from tunelab.adapters.lora import inject_lora
from tunelab.cli.app import app
from tunelab.models.run import save_run


@pytest.mark.parametrize("pooling", ["mean", "model"])
def test_merged_classifier_names_its_loader_and_the_pooling_caveat(tmp_path, smollm2_tokenizer, pooling):
    base = tmp_path / "base"
    model = tiny_classifier("decoder", vocab_size=len(smollm2_tokenizer), num_labels=3)
    model.config.pad_token_id = smollm2_tokenizer.pad_token_id
    model.save_pretrained(base)
    smollm2_tokenizer.save_pretrained(base)
    inject_lora(model, "all-linear", r=4, alpha=8, exclude=["score"])
    run = tmp_path / "run"
    save_run(run, model, smollm2_tokenizer, method="lora", base_model=str(base),
             config_yaml=f"task: classification\nclassification:\n  pooling: {pooling}\n", results={"steps": 1},
             task_type="SEQ_CLS", modules_to_save=["score"])
    result = CliRunner().invoke(app, ["merge", str(run), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "loads with AutoModelForSequenceClassification.from_pretrained" in out
    assert ("pooling: mean" in out) is (pooling == "mean")
