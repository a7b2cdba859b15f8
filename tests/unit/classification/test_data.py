"""Classification data: label spaces, record errors, pairs, truncation, stratified split, weights, builtin."""

import numpy as np
import pytest
import torch

from tunelab.config.classification import ClassificationConfig
from tunelab.config.load import validate_config
from tunelab.data.classification import (
    ClassificationExample, build_label_space, class_weight_vector, collate_classification,
    prepare_classification_data, stratified_holdout, tokenize_records,
)
from tunelab.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def bert_tokenizer():
    from tunelab.models.loading import load_tokenizer

    return load_tokenizer("all-minilm-l6-v2")


def space(records, **kw):
    return build_label_space(ClassificationConfig(**kw), records, "d.jsonl")


def test_label_names_sorted_and_numeric_labels_sorted_as_numbers():
    assert space([{"label": "pos"}, {"label": "neg"}, {"label": "neu"}]).names == ["neg", "neu", "pos"]
    ints = space([{"label": 10}, {"label": 2}, {"label": 1}])
    assert ints.names == ["1", "2", "10"] and ints.encode(10, "r") == 2


def test_explicit_names_accept_int_ids_and_reject_unknown_labels():
    labels = space([], labels=["neg", "pos"])
    assert labels.encode("pos", "r") == 1 and labels.encode(0, "r") == 0
    assert labels.id2label == {0: "neg", 1: "pos"} and labels.label2id == {"neg": 0, "pos": 1}
    with pytest.raises(DataError, match=r"d.jsonl record #7: unknown label 'meh'.*\['neg', 'pos'\]"):
        labels.encode("meh", "d.jsonl record #7")
    with pytest.raises(DataError, match="unknown label 5"):
        labels.encode(5, "r")


def test_multi_label_and_regression_targets():
    ml = space([{"label": ["b", "a"]}, {"label": []}], problem_type="multi_label")
    assert ml.names == ["a", "b"] and ml.encode(["b"], "r") == [0.0, 1.0]
    with pytest.raises(DataError, match="list of label names"):
        ml.encode("a", "r")
    reg = space([{"score": 2.5}], problem_type="regression", label_field="score")
    assert reg.names == ["score"] and reg.encode(3, "r") == [3.0]
    with pytest.raises(DataError, match="1 number"):
        reg.encode("high", "r")


def test_missing_text_or_label_names_the_record(bert_tokenizer):
    cc = ClassificationConfig(text_field="review")
    labels = space([], labels=["neg", "pos"])
    records = [{"review": "fine", "label": "pos"}, {"text": "oops", "label": "neg"}]
    with pytest.raises(DataError, match=r"data.csv record #2: text field 'review' .*missing.*\['label', 'text'\]"):
        tokenize_records(records, bert_tokenizer, cc, labels, max_seq_len=16, overlong="truncate", where="data.csv")
    with pytest.raises(DataError, match=r"record #1: no label field 'label'"):
        tokenize_records([{"review": "x"}], bert_tokenizer, cc, labels, max_seq_len=16, overlong="truncate",
                         where="data.csv")
    with pytest.raises(DataError, match="must be a non-empty string"):
        tokenize_records([{"review": "  ", "label": "pos"}], bert_tokenizer, cc, labels, max_seq_len=16,
                         overlong="truncate", where="data.csv")


def test_pairs_use_the_encoder_pair_template(bert_tokenizer):
    cc = ClassificationConfig(text_field="premise", text_pair_field="hypothesis")
    rec = {"premise": "a cat sat", "hypothesis": "an animal sat", "label": "yes"}
    (ex,), _ = tokenize_records([rec], bert_tokenizer, cc, space([], labels=["no", "yes"]), max_seq_len=32,
                                overlong="truncate", where="p")
    assert ex.input_ids == bert_tokenizer("a cat sat", "an animal sat")["input_ids"]
    assert ex.token_type_ids[0] == 0 and ex.token_type_ids[-1] == 1 and ex.target == 1


def test_pairs_for_a_decoder_are_joined_with_a_blank_line(smollm2_tokenizer):
    cc = ClassificationConfig(text_field="a", text_pair_field="b")
    (ex,), _ = tokenize_records([{"a": "first", "b": "second", "label": "x"}], smollm2_tokenizer, cc,
                                space([], labels=["x", "y"]), max_seq_len=32, overlong="truncate", where="p")
    assert ex.input_ids == smollm2_tokenizer("first\n\nsecond")["input_ids"] and ex.token_type_ids is None


@pytest.mark.parametrize("tokenizer_name", ["smollm2_tokenizer", "bert_tokenizer"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_truncated_pair_keeps_its_first_text_for_decoders_and_encoders(request, tokenizer_name, side):
    # PubMedQA-style question + abstract on a decoder with truncation_side: left used to keep only the
    # end of the abstract: the joined string lost the question first (breaker, issue 18).
    tokenizer = request.getfixturevalue(tokenizer_name)
    question = "Does aspirin reduce the risk of stroke in adults?"
    context = " ".join(f"sentence{i} of the abstract." for i in range(60))
    cc = ClassificationConfig(text_field="q", text_pair_field="c", truncation_side=side)
    (ex,), stats = tokenize_records([{"q": question, "c": context, "label": "x"}], tokenizer, cc,
                                    space([], labels=["x", "y"]), max_seq_len=48, overlong="truncate", where="p")
    text = tokenizer.decode(ex.input_ids, skip_special_tokens=True)
    assert stats.num_truncated == 1 and len(ex.input_ids) <= 48
    assert "does aspirin reduce the risk of stroke in adults?" in text.lower()
    kept = "sentence59" if side == "left" else "sentence0 "
    assert kept in text + " "


def test_truncation_side_and_drop(smollm2_tokenizer):
    text = " ".join(f"w{i}" for i in range(40))
    full = smollm2_tokenizer(text)["input_ids"]
    labels = space([], labels=["x", "y"])
    for side, expected in (("right", full[:8]), ("left", full[-8:])):
        cc = ClassificationConfig(truncation_side=side)
        (ex,), stats = tokenize_records([{"text": text, "label": "x"}], smollm2_tokenizer, cc, labels,
                                        max_seq_len=8, overlong="truncate", where="t")
        assert ex.input_ids == expected and stats.num_truncated == 1
    out, stats = tokenize_records([{"text": text, "label": "x"}, {"text": "short", "label": "y"}], smollm2_tokenizer,
                                  ClassificationConfig(), labels, max_seq_len=8, overlong="drop", where="t")
    assert len(out) == 1 and stats.num_dropped == 1 and stats.label_counts == {"y": 1}


def test_stratified_holdout_keeps_class_shares_and_is_deterministic():
    keys = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    train, held = stratified_holdout(keys, 0.2, seed=3)
    assert sorted(train + held) == list(range(100))
    assert [sum(keys[i] == k for i in held) for k in "abc"] == [12, 6, 2]
    assert stratified_holdout(keys, 0.2, seed=3) == (train, held)
    assert stratified_holdout(keys, 0.2, seed=4)[1] != held


def test_balanced_class_weights_follow_scikit_learn():
    from sklearn.utils.class_weight import compute_class_weight

    ids = [0] * 6 + [1] * 3 + [2] * 1
    exs = [ClassificationExample([1], None, i) for i in ids]
    labels = space([], labels=["a", "b", "c"])
    ours = class_weight_vector("balanced", exs, labels)
    assert torch.allclose(ours, torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    assert torch.allclose(ours, torch.tensor(compute_class_weight("balanced", classes=np.arange(3), y=np.array(ids))).float())
    assert class_weight_vector("none", exs, labels) is None
    assert torch.allclose(class_weight_vector("sqrt_balanced", exs, labels), ours.sqrt())
    with pytest.raises(DataError, match="2 entries"):
        class_weight_vector([1.0, 2.0], exs, labels)
    ml = [ClassificationExample([1], None, t) for t in ([1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0])]
    pos = class_weight_vector("balanced", ml, space([], labels=["a", "b"], problem_type="multi_label"))
    assert torch.allclose(pos, torch.tensor([1 / 3, 3.0]))


def test_collate_pads_on_either_side():
    exs = [ClassificationExample([5, 6, 7], [0, 0, 1], 1), ClassificationExample([8], [0], 0)]
    right = collate_classification(exs, pad_token_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]] and right["labels"].tolist() == [1, 0]
    left = collate_classification(exs, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]] and left["num_tokens"] == 4


def test_builtin_drugreview_splits_and_clean_text():
    from tunelab.data.builtin import load_builtin

    train, test = load_builtin("drugreview", None, "train"), load_builtin("drugreview", None, "test")
    assert len(train) == 600 and len(test) == 379
    assert {r["label"] for r in train} == {"negative", "neutral", "positive"}
    assert sum(r["label"] == "neutral" for r in test) == 36
    texts = [r["text"] for r in train + test]
    assert not any("&#039;" in t or "&amp;" in t or t.startswith('"') for t in texts)
    assert any("'" in t for t in texts)
    with pytest.raises(DataError, match="splits"):
        load_builtin("drugreview", None, "validation")


def test_prepare_holds_out_stratified_validation(bert_tokenizer):
    config = validate_config({
        "task": "classification", "model": {"name_or_path": "x"}, "data": {
            "train": {"path": "builtin:drugreview"}, "val_fraction": 0.15, "max_seq_len": 64},
        "classification": {}})
    data = prepare_classification_data(config, bert_tokenizer)
    assert len(data.train) + len(data.validation) == 600
    assert data.validation_stats.label_counts == {"negative": 24, "neutral": 8, "positive": 58}
    assert data.train_stats.num_truncated > 0 and max(len(e.input_ids) for e in data.train) == 64
    bad = config.model_copy(update={"data": config.data.model_copy(update={"columns": {"text": "review"}})})
    with pytest.raises(ConfigError, match="classification.text_field"):
        prepare_classification_data(bad, bert_tokenizer)
