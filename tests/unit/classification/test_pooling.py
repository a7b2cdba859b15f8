"""classification.pooling: mean pooling reads the masked mean of the final hidden states into the same head.

Checked against the mean computed by hand from the base model's hidden states, for BERT-style
(Linear classifier), RoBERTa/MPNet-style (dense → out_proj) and decoder (score) heads; padding
never changes it; the trained run's eval reads the head the same way (issue 18, MPNet item).
"""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.errors import ConfigError
from tunelab.models.heads import masked_mean, sequence_logits
from tests.unit.classification.helpers import tiny_classifier


def _batch(rows: list[list[int]], pad: int = 0, left: bool = False) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = [([pad] * (width - len(r)) + r) if left else (r + [pad] * (width - len(r))) for r in rows]
    mask = [([0] * (width - len(r)) + [1] * len(r)) if left else ([1] * len(r) + [0] * (width - len(r))) for r in rows]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


ROWS = [[5, 9, 13, 7, 21], [8, 4]]


def _hand_mean(hidden: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    return torch.stack([hidden[i, :n].mean(dim=0) for i, n in enumerate(lengths)])


def test_masked_mean_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.allclose(masked_mean(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(masked_mean(hidden, torch.tensor([[0, 0, 0]])), torch.zeros(1, 2))


def test_bert_mean_pooling_skips_the_cls_pooler_and_equals_the_hand_mean():
    model = tiny_classifier("encoder")
    batch = _batch(ROWS)
    hidden = model.bert(**batch).last_hidden_state
    expected = model.classifier(_hand_mean(hidden, [5, 2]))
    with torch.no_grad():
        got = sequence_logits(model, batch, "mean")
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(got, sequence_logits(model, batch), atol=1e-3)  # not the [CLS] read-out
        assert torch.allclose(sequence_logits(model, _batch(ROWS, left=True), "mean"), got, atol=1e-5)
        alone = sequence_logits(model, _batch([ROWS[1]]), "mean")
        assert torch.allclose(alone[0], got[1], atol=1e-5)  # padding in a batch changes nothing


@pytest.mark.parametrize("kind", ["roberta", "mpnet"])
def test_first_position_heads_get_the_mean(kind):
    import transformers

    cls_config = {"roberta": transformers.RobertaConfig, "mpnet": transformers.MPNetConfig}[kind]
    cls_model = {"roberta": transformers.RobertaForSequenceClassification,
                 "mpnet": transformers.MPNetForSequenceClassification}[kind]
    torch.manual_seed(0)
    config = cls_config(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=3, pad_token_id=1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = cls_model(config).eval()
    batch = _batch(ROWS, pad=1)
    with torch.no_grad():
        hidden = getattr(model, model.base_model_prefix)(**batch).last_hidden_state
        pooled = _hand_mean(hidden, [5, 2])
        head = model.classifier
        expected = head.out_proj(torch.tanh(head.dense(pooled)))
        assert torch.allclose(sequence_logits(model, batch, "mean"), expected, atol=1e-5)
        assert torch.allclose(sequence_logits(model, _batch(ROWS, pad=1, left=True), "mean"), expected, atol=1e-5)


def test_decoder_mean_pooling_reads_the_mean_of_real_tokens():
    model = tiny_classifier("decoder")
    with torch.no_grad():
        right = sequence_logits(model, _batch(ROWS), "mean")
        left = sequence_logits(model, _batch(ROWS, left=True), "mean")
        hidden = model.model(input_ids=torch.tensor([ROWS[0]])).last_hidden_state
        assert torch.allclose(right[0], model.score(hidden[0].mean(0)), atol=1e-5)
        assert torch.allclose(left, right, atol=1e-5)


def test_unknown_head_shape_is_a_config_error():
    model = tiny_classifier("encoder")
    model.classifier = torch.nn.Sequential(torch.nn.Linear(32, 3))
    with pytest.raises(ConfigError, match="pooling=mean.*unsupported head"):
        sequence_logits(model, _batch(ROWS), "mean")


def test_recipe_trains_with_mean_pooling_and_eval_reads_the_head_the_same_way(tmp_path):
    from tunelab.cli.classify_cmds import evaluate_run
    from tunelab.config.load import validate_config
    from tunelab.models.loading import load_tokenizer
    from tunelab.recipes.classify import train
    from tests.unit.classification.helpers import tiny_base_dir
    from tests.unit.classification.test_recipe import make_config, quiet, sentiment_rows, write_jsonl

    model_dir = tiny_base_dir("encoder", tmp_path / "enc", load_tokenizer("all-minilm-l6-v2"))
    data = write_jsonl(tmp_path / "train.jsonl", sentiment_rows())
    raw = make_config(tmp_path, model_dir, data, pooling="mean", head_init="linear_probe")
    raw["data"]["val_fraction"] = 0.0
    raw["train"].update(epochs=2, metric_for_best=None)
    raw["eval"]["before_training"] = False
    config = validate_config(raw)
    assert config.classification.pooling == "mean"
    train(config, console=quiet())
    metrics = evaluate_run(tmp_path / "run", str(data))
    # the same weights read with the model's own [CLS] read-out give other logits: eval must use mean
    from tunelab.eval.classification import load_classification_run, predict_logits
    from tunelab.data.classification import collate_classification, tokenize_records
    model, tokenizer, cfg, labels = load_classification_run(tmp_path / "run")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    examples, _ = tokenize_records(rows, tokenizer, cfg.classification, labels, max_seq_len=32, overlong="truncate",
                                   where="t")
    batches = [collate_classification(examples, tokenizer.pad_token_id)]
    mean = predict_logits(model, batches, torch.device("cpu"), pooling="mean")
    accuracy = float((mean.argmax(-1) == batches[0]["labels"]).float().mean())
    assert metrics["accuracy"] == pytest.approx(accuracy)
    assert not torch.allclose(mean, predict_logits(model, batches, torch.device("cpu")), atol=1e-3)
