"""Real weights (slower; `-m integration`): MiniLM and SmolLM2 classifiers on real drug reviews."""

import json

import pytest
import torch

from tunelab.config.load import validate_config
from tunelab.data.classification import collate_classification, prepare_classification_data
from tunelab.models.heads import sequence_logits

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("model, method", [("all-minilm-l6-v2", "full"), ("smollm2-135m-instruct", "lora")])
def test_short_run_saves_a_classifier_that_reloads_exactly(tmp_path, model, method):
    from rich.console import Console

    from tunelab.eval.classification import load_classification_run
    from tunelab.recipes.classify import train

    config = validate_config({
        "task": "classification", "output_dir": str(tmp_path / "run"), "model": {"name_or_path": model},
        "data": {"train": {"path": "builtin:drugreview"}, "max_examples": 48, "val_fraction": 0.25,
                 "max_seq_len": 64},
        "train": {"method": method, "max_steps": 3, "batch_size": 4, "grad_accum": 1, "lr": 1e-4, "threads": 2,
                  "metric_for_best": "accuracy"},
        "eval": {"before_training": False}, "classification": {}})
    results = train(config, console=Console(quiet=True))
    assert results["steps"] == 3 and results["label_space"]["names"] == ["negative", "neutral", "positive"]

    reloaded, tokenizer, _, _ = load_classification_run(tmp_path / "run")
    data = prepare_classification_data(config, tokenizer)
    examples = data.validation[:4]
    info = json.loads((tmp_path / "run" / "tunelab.json").read_text())
    assert info["task_type"] == "SEQ_CLS"

    def logits(exs, side):
        batch = collate_classification(exs, tokenizer.pad_token_id, padding_side=side)
        with torch.no_grad():
            return sequence_logits(reloaded, {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})

    singles = torch.cat([logits([e], "right") for e in examples])
    assert torch.isfinite(singles).all()
    assert torch.allclose(logits(examples, "left"), singles, atol=1e-4)
    assert torch.allclose(logits(examples, "right"), singles, atol=1e-4)
