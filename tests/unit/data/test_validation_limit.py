"""data.max_validation_examples holds for every task that reads data.validation (issue 18: the MedQuAD
SFT config evaluates on the first N held-out pairs). Before, only dpo/kto/reward read it: SFT,
classification and RL prompts silently evaluated on the whole split (these tests fail on the old code)."""

import json

import pytest

from tests.toy_tokenizers import byte_bpe_tokenizer
from tunelab.config.load import validate_config
from tunelab.config.schema import DataConfig
from tunelab.data.classification import prepare_classification_data
from tunelab.data.pipeline import prepare_data


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def qa_rows(n, tag):
    return [{"messages": [{"role": "user", "content": f"{tag} question {i}?"},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(n)]


@pytest.mark.parametrize("limit, expected", [(None, 7), (3, 3), (50, 7)])
def test_sft_uses_the_first_n_held_out_records(tmp_path, limit, expected):
    cfg = DataConfig(train={"path": write_jsonl(tmp_path / "t.jsonl", qa_rows(5, "train"))},
                     validation={"path": write_jsonl(tmp_path / "v.jsonl", qa_rows(7, "held"))},
                     max_validation_examples=limit, max_seq_len=64)
    data = prepare_data(cfg, byte_bpe_tokenizer(), seed=0)
    assert len(data.validation) == expected and data.validation_stats.num_records == expected
    assert [e["messages"][0]["content"] for e in data.validation_examples] == [
        f"held question {i}?" for i in range(expected)]  # the first N, in order
    assert len(data.train) == 5


def test_classification_uses_the_first_n_held_out_records(tmp_path):
    rows = [{"text": f"review {i} good" if i % 2 else f"review {i} bad", "label": "pos" if i % 2 else "neg"}
            for i in range(10)]
    config = validate_config({
        "task": "classification", "model": {"name_or_path": "m"},
        "data": {"train": {"path": write_jsonl(tmp_path / "t.jsonl", rows)},
                 "validation": {"path": write_jsonl(tmp_path / "v.jsonl", rows[:6]), "split": "train"},
                 "max_validation_examples": 4, "max_seq_len": 32},
        "classification": {"labels": ["neg", "pos"]}})
    data = prepare_classification_data(config, byte_bpe_tokenizer())
    assert len(data.validation) == 4 and len(data.train) == 10

