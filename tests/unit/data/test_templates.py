"""Label masks rendered with the real SmolLM2 chat template (ChatML, no generation markers)."""

from tunelab.data.tokenize import IGNORE_INDEX, DataStats, Tokenizer

CONVERSATION = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "My printer is not printing."},
    {"role": "assistant", "content": "Check the paper tray."},
    {"role": "user", "content": "Still nothing."},
    {"role": "assistant", "content": "Restart it, then reinstall the driver."},
]}


def supervised_text(tokenizer, example):
    return tokenizer.decode([t for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX])


def test_exactly_assistant_replies_and_end_of_turn_are_supervised(smollm2_tokenizer):
    tok = smollm2_tokenizer
    [example] = Tokenizer(tok, 512, "truncate", "assistant")(CONVERSATION, DataStats())
    assert supervised_text(tok, example) == (
        "Check the paper tray.<|im_end|>Restart it, then reinstall the driver.<|im_end|>")
    # the supervised tokens are exactly the reply tokens + <|im_end|>, as tokenized in context
    reply_ids = tok("Check the paper tray.", add_special_tokens=False).input_ids + [tok.eos_token_id]
    labels = [l for l in example.labels if l != IGNORE_INDEX]
    assert labels[: len(reply_ids)] == reply_ids
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id  # pad == eos, still supervised


def test_last_turn_and_all(smollm2_tokenizer):
    tok = smollm2_tokenizer
    [last] = Tokenizer(tok, 512, "truncate", "last_turn")(CONVERSATION, DataStats())
    assert supervised_text(tok, last) == "Restart it, then reinstall the driver.<|im_end|>"
    [everything] = Tokenizer(tok, 512, "truncate", "all")(CONVERSATION, DataStats())
    assert everything.labels[0] == IGNORE_INDEX and all(l != IGNORE_INDEX for l in everything.labels[1:])


def test_no_doubled_bos_and_template_text_is_kept(smollm2_tokenizer):
    tok = smollm2_tokenizer
    [example] = Tokenizer(tok, 512, "truncate", "assistant")(CONVERSATION, DataStats())
    rendered = tok.apply_chat_template(CONVERSATION["messages"], tokenize=False)
    assert tok.decode(example.input_ids) == rendered
    assert example.input_ids[:2].count(example.input_ids[0]) == 1


def test_truncation_drop_and_zero_supervised_accounting(smollm2_tokenizer):
    tok = smollm2_tokenizer
    long_prompt = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    stats = DataStats()
    assert Tokenizer(tok, 64, "truncate", "assistant")(long_prompt, stats) == []
    assert stats.dropped["no supervised tokens after truncation"] == 1 and stats.num_truncated == 1
    stats = DataStats()
    assert Tokenizer(tok, 64, "drop", "assistant")(long_prompt, stats) == []
    assert stats.dropped["longer than max_seq_len"] == 1


def test_raw_text_is_split_into_blocks_and_ends_with_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    stats = DataStats()
    blocks = Tokenizer(tok, 16, "truncate", "assistant")({"text": "lorem ipsum dolor sit amet " * 10}, stats)
    assert len(blocks) > 1 and all(len(b.input_ids) <= 16 for b in blocks)
    assert blocks[-1].input_ids[-1] == tok.eos_token_id and stats.num_ending_with_end_of_turn == stats.num_replies == 1


def test_prompt_completion_uses_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    [example] = Tokenizer(tok, 512, "truncate", "assistant")({"prompt": "Hi", "completion": "Hello."}, DataStats())
    assert supervised_text(tok, example) == "Hello.<|im_end|>"
