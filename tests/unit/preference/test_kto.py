"""Issue 14 item 13: KTO data (unpaired labels or pairs split in two; mismatched prompt/completion
pairs for z_ref at every batch size), config keys, the recipe end to end on a tiny Llama, and the
shipped qa-feedback config. All new: KTO did not exist before (every test fails on the old code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tunelab.config.load import load_config, validate_config
from tunelab.data.kto import kto_collate, mismatched_partners, prepare_kto, to_kto_examples
from tunelab.data.preference import PairTokenizer
from tunelab.errors import ConfigError, DataError

QUIET = Console(quiet=True)
ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_no_example_meets_its_own_completion_or_prompt_at_any_batch_size(size: int) -> None:
    keys = list(range(size))
    partners = mismatched_partners(keys)
    if size == 1:
        assert partners == [None]  # defined: no mismatched pair, z_ref = 0 (kl_mask False)
    else:
        assert all(j is not None and j != i for i, j in enumerate(partners))
    # derived pairs: both halves share a prompt -> a partner is never the other answer to the same prompt
    shared = [k // 2 for k in range(2 * size)]
    for i, j in enumerate(mismatched_partners(shared)):
        assert (j is None) == (size == 1) and (j is None or shared[j] != shared[i])
    assert mismatched_partners([5, 5]) == [None, None]


def _tokenizer_examples(smollm2_tokenizer, records, max_seq_len=64):
    encode = PairTokenizer(smollm2_tokenizer, max_seq_len)
    from tunelab.data.kto import tokenize_kto

    canon = [e for r in records for e in to_kto_examples(r, {}, "test")]
    return encode, tokenize_kto(canon, encode, {})[0]


def test_kto_collate_layout_rows_and_masks(smollm2_tokenizer) -> None:
    records = [{"prompt": f"question {i}?", "completion": f"answer number {i}.", "label": i % 2 == 0}
               for i in range(3)]
    encode, examples = _tokenizer_examples(smollm2_tokenizer, records)
    batch = kto_collate(examples, encode, smollm2_tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and batch["num_pairs"] == 3
    assert batch["desirable"].tolist() == [True, False, True] and batch["kl_mask"].tolist() == [True] * 3
    decode = lambda row: smollm2_tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row]])
    for i in range(3):  # KL row i: prompt of example i, completion of example i + 1
        assert f"question {i}?" in decode(3 + i) and f"answer number {(i + 1) % 3}." in decode(3 + i)
        assert f"answer number {i}." not in decode(3 + i)
    single = kto_collate(examples[:1], encode, smollm2_tokenizer.pad_token_id)
    assert single["kl_mask"].tolist() == [False]


def test_records_labels_and_pairs(tmp_path) -> None:
    assert [e["desirable"] for e in to_kto_examples({"prompt": "p", "chosen": "a", "rejected": "b"}, {}, "r")] == \
        [True, False]
    assert to_kto_examples({"q": "p", "c": "a", "ok": False}, {"prompt": "q", "completion": "c", "label": "ok"},
                           "r")[0]["desirable"] is False
    with pytest.raises(DataError, match="true or false"):
        to_kto_examples({"prompt": "p", "completion": "a", "label": 1}, {}, "r")
    with pytest.raises(DataError, match="label"):
        to_kto_examples({"prompt": "p", "text": "a"}, {}, "r")


def test_config_keys_and_errors() -> None:
    base = {"task": "dpo", "model": {"name_or_path": "x"}, "data": {"train": {"path": "x"}}}
    pc = validate_config({**base, "preference": {"loss": "kto", "undesirable_weight": 1.5}}).preference
    assert pc.beta == 0.1 and pc.desirable_weight == 1.0 and pc.undesirable_weight == 1.5
    assert pc.resolved_reference("lora") == "adapters_off" and pc.resolved_reference("full") == "frozen_copy"
    for raw, needle in (({"preference": {"loss": "kto", "reference": "precomputed"}}, "precomputed"),
                        ({"preference": {"loss": "kto"}, "data": {"train": {"path": "x"}, "packing": True}}, "packing"),
                        ({"preference": {"loss": "kto", "desirable_weight": 0}}, "desirable_weight")):
        with pytest.raises(ConfigError, match=needle):
            validate_config({**base, **raw})


def test_kto_recipe_end_to_end(tmp_path, tiny_model_dir) -> None:
    from tunelab.recipes.dpo import train

    rows = [{"prompt": f"Question {i}: what about error {i}?", "chosen": f"Restart service {i}.",
             "rejected": f"I am not sure what error {i} means, sorry."} for i in range(8)]
    unpaired = [{"prompt": f"Other {i}?", "completion": f"Reply {i}.", "label": i % 3 != 0} for i in range(3)]
    train_file, held_file = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:5] + unpaired))
    held_file.write_text("".join(json.dumps(r) + "\n" for r in rows[5:]))
    config = validate_config({
        "task": "dpo", "output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": {"path": str(train_file)}, "validation": {"path": str(held_file)}, "max_seq_len": 64},
        "preference": {"loss": "kto", "beta": 0.5},
        "train": {"max_steps": 3, "batch_size": 3, "grad_accum": 1, "lr": 1e-2, "eval_every": 3, "threads": 1},
        "lora": {"r": 4, "alpha": 8}, "eval": {"sample_questions": 0, "batch_size": 4}})
    results = train(config, console=QUIET)
    before, after = results["held_out_before"], results["held_out_after"]
    assert results["loss"] == "kto" and results["train"]["examples"] == 13 and results["train"]["records"] == 8 and results["samples"] == []
    assert before["loss"] == pytest.approx(0.5) and before["rewards/margins"] == 0.0  # policy == reference
    assert before["pairs"] == 3 and "pairs/policy/accuracy" in after and after["examples"] == 6
    assert after["rewards/margins"] > 0  # desirable rewards rise above undesirable ones
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in lines if "loss" in r)
    assert {"kto/kl", "kto/kl_pairs", "rewards/chosen"} <= set(step) and step["units"] == 3


def test_shipped_qa_feedback_kto_config_and_builtin() -> None:
    config = load_config(ROOT / "configs" / "kto" / "qa-feedback-kto.yaml")
    assert config.task == "dpo" and config.preference.loss == "kto" and config.train.method == "lora"
    assert config.model.name_or_path == "smollm2-135m-instruct"
    assert config.data.train.path == "builtin:qa-feedback" and config.data.validation.split == "validation"
    from tunelab.data.builtin import load_builtin

    train, held = load_builtin("qa-feedback", None, "train"), load_builtin("qa-feedback", None, "validation")
    assert len(train) + len(held) == 2616 and not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert train == load_builtin("qa-feedback", None, "train")  # deterministic
    one = load_builtin("qa-feedback", "one-per-question", "validation")
    assert len({r["question_id"] for r in one}) == len(one) and {r["prompt"] for r in one} <= {r["prompt"] for r in held}
    with pytest.raises(DataError, match="subsets"):
        load_builtin("qa-feedback", "all", "train")
    assert (ROOT / "src" / "tunelab" / "data" / "assets" / "qa_feedback" / "LICENSE").is_file()
