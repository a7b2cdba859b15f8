"""Preference records → pairs → [chosen; rejected] batches (real SmolLM2 and MiniLM tokenizers)."""

import pytest
import torch

from tunelab.data.preference import (
    PairTokenizer, preference_batch_plan, preference_collate, preference_packed_collate, to_preference_example,
    tokenize_pairs,
)
from tunelab.data.tokenize import DataStats
from tunelab.errors import DataError

SYSTEM = {"role": "system", "content": "Be terse."}
USER = {"role": "user", "content": "My printer is offline."}


def reply_of(tok, ids, labels):
    return tok.decode([t for t, l in zip(ids, labels) if l != -100])


def pair_of(tok, record, max_seq_len=512):
    stats = DataStats()
    return PairTokenizer(tok, max_seq_len)(to_preference_example(record, {}, "r"), stats), stats


def test_string_form_labels_only_the_reply_and_end_of_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    pair, _ = pair_of(tok, {"prompt": "My printer is offline.", "chosen": "Restart it.", "rejected": "No idea."})
    assert reply_of(tok, pair.chosen_ids, pair.chosen_labels) == "Restart it.<|im_end|>"
    assert reply_of(tok, pair.rejected_ids, pair.rejected_labels) == "No idea.<|im_end|>"
    text = tok.decode(pair.chosen_ids)
    assert "<|im_start|>user\nMy printer is offline.<|im_end|>" in text and text.index("Restart") > text.index("user")


def test_message_lists_and_implicit_prompt_give_the_same_pair(smollm2_tokenizer):
    tok = smollm2_tokenizer
    explicit, _ = pair_of(tok, {"prompt": [SYSTEM, USER], "chosen": [{"role": "assistant", "content": "Restart it."}],
                                "rejected": "No idea."})
    implicit, _ = pair_of(tok, {"chosen": [SYSTEM, USER, {"role": "assistant", "content": "Restart it."}],
                                "rejected": [SYSTEM, USER, {"role": "assistant", "content": "No idea."}]})
    assert explicit.chosen_ids == implicit.chosen_ids and explicit.rejected_labels == implicit.rejected_labels
    assert "Be terse." in tok.decode(explicit.chosen_ids)


def test_multi_turn_prompt_assistant_turns_are_not_counted(smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = [USER, {"role": "assistant", "content": "Is it plugged in?"}, {"role": "user", "content": "Yes."}]
    pair, _ = pair_of(tok, {"prompt": prompt, "chosen": "Then restart it.", "rejected": "Buy a new one."})
    assert reply_of(tok, pair.chosen_ids, pair.chosen_labels) == "Then restart it.<|im_end|>"


def test_empty_and_identical_replies_are_dropped_and_counted(smollm2_tokenizer):
    records = [{"prompt": "q", "chosen": "a", "rejected": "  "}, {"prompt": "q", "chosen": "", "rejected": "b"},
               {"prompt": "q", "chosen": "same", "rejected": "same"}, {"prompt": "q", "chosen": "a", "rejected": "b"}]
    pairs, stats = tokenize_pairs([to_preference_example(r, {}, "r") for r in records],
                                  PairTokenizer(smollm2_tokenizer, 64))
    assert len(pairs) == 1 and pairs[0].index == 0
    assert dict(stats.dropped) == {"empty rejected reply": 1, "empty chosen reply": 1, "identical replies": 1}


def test_truncation_cuts_prompt_left_then_replies_right(smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = " ".join(f"word{i}" for i in range(80)) + " END"
    chosen = " ".join(f"yes{i}" for i in range(60))
    full, _ = pair_of(tok, {"prompt": prompt, "chosen": chosen, "rejected": "Short."}, max_seq_len=4096)
    pair, stats = pair_of(tok, {"prompt": prompt, "chosen": chosen, "rejected": "Short."}, max_seq_len=96)
    assert stats.num_truncated == 1
    assert len(pair.chosen_ids) == 96 and len(pair.rejected_ids) <= 96
    first_reply = pair.chosen_labels.index(next(l for l in pair.chosen_labels if l != -100))
    assert first_reply == 48  # the prompt keeps max_seq_len // 2 tokens: its most recent ones
    full_first = full.chosen_labels.index(next(l for l in full.chosen_labels if l != -100))
    assert pair.chosen_ids[:first_reply] == full.chosen_ids[full_first - 48:full_first]
    assert pair.rejected_ids[:first_reply] == pair.chosen_ids[:first_reply]  # same prompt on both sides
    assert pair.chosen_ids[first_reply:] == full.chosen_ids[full_first:full_first + 48]  # reply cut on the right


def test_encoder_without_chat_template_keeps_cls_and_sep():
    from tunelab.models.loading import load_tokenizer

    tok = load_tokenizer("all-minilm-l6-v2")
    assert not tok.chat_template
    pair, _ = pair_of(tok, {"prompt": "drug review: " + "x " * 100, "chosen": "it helped " * 50, "rejected": "no"},
                      max_seq_len=64)
    for ids in (pair.chosen_ids, pair.rejected_ids):
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and ids.count(tok.cls_token_id) == 1
    assert len(pair.chosen_ids) == 64
    with pytest.raises(DataError, match="chat template"):
        pair_of(tok, {"prompt": [USER], "chosen": "a", "rejected": "b"})


@pytest.mark.parametrize("record, needle", [
    ({"prompt": "q", "chosen": "a"}, "needs 'chosen' and 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "without a 'prompt'"),
    ({"chosen": [USER, {"role": "user", "content": "x"}], "rejected": [USER, {"role": "assistant", "content": "y"}]},
     "continue with an assistant turn"),
    ({"prompt": "q", "chosen": [{"role": "bot", "content": "a"}], "rejected": "b"}, "message 0"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be"),
])
def test_bad_records_name_the_record(record, needle):
    with pytest.raises(DataError, match=needle) as err:
        to_preference_example(record, {}, "pairs.jsonl record #7")
    assert "record #7" in str(err.value)


def test_columns_and_margin_field():
    example = to_preference_example({"q": "x", "good": "a", "bad": "b", "m": 2}, {"prompt": "q", "chosen": "good",
                                     "rejected": "bad"}, "r", margin_field="m", default_margin=0.5)
    assert example["prompt"] == "x" and example["margin"] == 2.0
    assert to_preference_example({"prompt": "x", "chosen": "a", "rejected": "b"}, {}, "r", "m", 0.5)["margin"] == 0.5


def test_collate_puts_chosen_first_then_rejected(smollm2_tokenizer):
    tok = smollm2_tokenizer
    pairs, _ = tokenize_pairs([to_preference_example({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"},
                                                     {}, "r") for i in range(3)], PairTokenizer(tok, 64))
    batch = preference_collate(pairs, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and batch["num_pairs"] == 3
    for i in range(3):
        assert "good" in tok.decode(batch["input_ids"][i][batch["attention_mask"][i]])
        assert "bad" in tok.decode(batch["input_ids"][3 + i][batch["attention_mask"][3 + i]])
    left = preference_collate(pairs, tok.pad_token_id, padding_side="left")
    assert torch.equal(left["input_ids"][left["attention_mask"]], batch["input_ids"][batch["attention_mask"]])
    packed = preference_packed_collate([pairs[:2], pairs[2:]], tok.pad_token_id)
    ids, seq = packed["input_ids"], packed["sequence_ids"]
    assert "good 2" in tok.decode(ids[seq == 2]) and "bad 2" in tok.decode(ids[seq == 5])
    assert "position_ids" in packed and "attention_mask" not in packed and packed["pair_index"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("packing", [False, True])
def test_batch_plan_covers_every_pair_once_and_is_deterministic(smollm2_tokenizer, packing):
    tok = smollm2_tokenizer
    pairs, _ = tokenize_pairs([to_preference_example({"prompt": f"q{i}", "chosen": "a" * (i + 1), "rejected": "b"},
                                                     {}, "r") for i in range(7)], PairTokenizer(tok, 64))
    plan = preference_batch_plan(pairs, batch_size=2, max_seq_len=64, packing=packing, shuffle=True, seed=3,
                                 pad_token_id=tok.pad_token_id)
    epoch = plan.make_epoch(0)
    assert len(epoch) == plan.micro_batches_per_epoch
    assert sorted(i for b in epoch for i in b["pair_index"].tolist()) == list(range(7))
    assert [b["pair_index"].tolist() for b in epoch] == [b["pair_index"].tolist() for b in plan.make_epoch(0)]
