"""Data → tokens invariants (issue 13 items 1-5, issue 15 item 10), on two toy tokenizer families
(byte-level BPE, word-level), templates that are not ChatML (Llama-3-like, Gemma-like), templates
that are not prefix-stable, and the real SmolLM2 tokenizer."""

from __future__ import annotations

import json

import pytest

from tests.toy_tokenizers import (
    DATED_TEMPLATE, GEMMA_LIKE, LLAMA3_LIKE, LLAMA3_LIKE_NO_BOS, REASONING_TEMPLATE, byte_bpe_tokenizer,
    word_tokenizer,
)
from tunelab.config.schema import DataConfig, DataSource
from tunelab.data.encoding import prompt_ids
from tunelab.data.preference import PairTokenizer
from tunelab.data.templates import apply_template
from tunelab.data.tokenize import IGNORE_INDEX, DataStats, Tokenizer
from tunelab.models.generate import encode_prompts
from tunelab.rollout.prompts import load_prompts

# a template whose generation prompt ends in a space: byte-level BPE merges it into the reply's first word
SPACE_HEADER = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
TWO_TURNS = [
    {"role": "user", "content": "My printer is not printing."},
    {"role": "assistant", "content": "Check the paper tray."},
    {"role": "user", "content": "Still nothing."},
    {"role": "assistant", "content": "Restart it, then reinstall the driver."},
]


def supervised(tok, example) -> str:
    return tok.decode([t for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX])


def first_label(labels) -> int:
    return next(i for i, l in enumerate(labels) if l != IGNORE_INDEX)


def tokenize(tok, example, supervise="assistant", stats=None):
    return Tokenizer(tok, 512, "truncate", supervise)(example, stats if stats is not None else DataStats())


def fresh_smollm2(smollm2_tokenizer, template="keep"):
    import copy

    tok = copy.deepcopy(smollm2_tokenizer)
    if template != "keep":  # the toy templates' markers, spelled with SmolLM2's special tokens
        tok.chat_template = template and template.replace("<|eot_id|>", "<|im_end|>").replace(
            "<|start_header_id|>", "<|im_start|>").replace("<|end_header_id|>", "")
    return tok


# ---- 13.1 boundary tokens ---------------------------------------------------------------------------

def test_a_reply_token_that_starts_in_the_prompt_is_supervised(smollm2_tokenizer):
    """ "A: " + "Paris": byte-level BPE makes " Paris" one token starting in the prompt; it is learned."""
    for tok in (byte_bpe_tokenizer(template=None), fresh_smollm2(smollm2_tokenizer, None)):
        [example] = tokenize(tok, {"prompt": "Q: capital of France? A: ", "completion": "Paris"})
        ids = tok("Q: capital of France? A: Paris", add_special_tokens=False).input_ids
        assert tok.decode(ids[-1:]) == " Paris"  # the merge this test is about
        assert ids[-1] in [l for l in example.labels if l != IGNORE_INDEX]
        assert supervised(tok, example) == " Paris" + tok.eos_token
    for tok in (byte_bpe_tokenizer(SPACE_HEADER), fresh_smollm2(smollm2_tokenizer, SPACE_HEADER)):
        [example] = tokenize(tok, {"messages": [{"role": "user", "content": "capital of France?"},
                                                {"role": "assistant", "content": "Paris"}]})
        assert supervised(tok, example) in (" Paris<|eot_id|>", " Paris<|im_end|>")
    word = word_tokenizer()  # no merging: exactly the reply and the end-of-turn token
    [example] = tokenize(word, {"messages": [{"role": "user", "content": "capital of France?"},
                                             {"role": "assistant", "content": "Paris"}]})
    assert supervised(word, example) == "Paris <end_of_turn>"


@pytest.mark.parametrize("template", [None, SPACE_HEADER, LLAMA3_LIKE])
def test_pairs_share_prompt_ids_and_every_reply_token_counts(template, smollm2_tokenizer):
    for tok in (byte_bpe_tokenizer(template), fresh_smollm2(smollm2_tokenizer, template)):
        stats = DataStats()
        pair = PairTokenizer(tok, 256)({"prompt": "Q: capital of France? A: ", "chosen": "Paris",
                                        "rejected": "London", "margin": 0.0}, stats)
        c, r = first_label(pair.chosen_labels), first_label(pair.rejected_labels)
        assert c == r and pair.chosen_ids[:c] == pair.rejected_ids[:r]  # the same prompt ids
        for ids, labels, word in ((pair.chosen_ids, pair.chosen_labels, "Paris"),
                                  (pair.rejected_ids, pair.rejected_labels, "London")):
            assert all(l != IGNORE_INDEX for l in labels[c:]) or template is None  # every reply token counts
            assert word in tok.decode([t for t, l in zip(ids, labels) if l != IGNORE_INDEX])
        assert stats.num_ending_with_end_of_turn == stats.num_replies == 2


# ---- 13.2 every assistant turn ----------------------------------------------------------------------

OPENS_WITH_ASSISTANT = [{"role": "assistant", "content": "Hello there, how are you today?"}] + TWO_TURNS


def test_every_assistant_turn_is_supervised_including_an_opening_one(smollm2_tokenizer):
    cases = [(byte_bpe_tokenizer(), "<|eot_id|>"), (word_tokenizer(), " <end_of_turn>"),
             (smollm2_tokenizer, "<|im_end|>")]
    for tok, eot in cases:
        [example] = tokenize(tok, {"messages": OPENS_WITH_ASSISTANT})
        text = supervised(tok, example)
        for reply in ("Hello there, how are you today?", "Check the paper tray.",
                      "Restart it, then reinstall the driver."):
            expected = tok.decode(tok(reply, add_special_tokens=False).input_ids)
            assert expected + eot in text, (tok.__class__, text)


def test_a_reply_that_cannot_be_located_is_dropped_with_a_named_reason():
    rewrites = ("{% if not messages %}{{ raise_exception('empty') }}{% endif %}{% for m in messages %}"
                "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | upper }}<|eot_id|>"
                "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    stats = DataStats()
    assert tokenize(byte_bpe_tokenizer(rewrites), {"messages": OPENS_WITH_ASSISTANT}, stats=stats) == []
    assert stats.dropped == {"reply text not found in the rendered conversation": 1}


# ---- 13.3 templates that are not prefix-stable ------------------------------------------------------

THINKING = [
    {"role": "user", "content": "My printer is not printing."},
    {"role": "assistant", "content": "<think>paper?</think>Check the paper tray."},
    {"role": "user", "content": "Still nothing."},
    {"role": "assistant", "content": "<think>driver?</think>Restart it, then reinstall the driver."},
]


@pytest.mark.parametrize("make", [byte_bpe_tokenizer, word_tokenizer])
@pytest.mark.parametrize("template", [REASONING_TEMPLATE, DATED_TEMPLATE])
def test_not_prefix_stable_templates(make, template):
    if make is word_tokenizer:  # the same template spelled with the word vocabulary's markers
        template = template.replace("<|start_header_id|>", "<start_of_turn>").replace(
            "<|end_header_id|>", "").replace("<|eot_id|>", "<end_of_turn>")
    tok = make(template)
    stats = DataStats()
    [last] = tokenize(tok, {"messages": THINKING}, "last_turn", stats)
    assert last.input_ids[:first_label(last.labels)] == prompt_ids(tok, THINKING[:3])  # as served
    assert "Restart" in supervised(tok, last) and "paper" not in supervised(tok, last) and stats.num_split == 0
    examples = tokenize(tok, {"messages": THINKING}, "assistant", stats)
    assert len(examples) == 2 and stats.num_split == 1
    for example, i in zip(examples, (1, 3)):
        start = first_label(example.labels)
        assert example.input_ids[:start] == prompt_ids(tok, THINKING[:i])  # the context served for this reply
        reply = tok.decode(tok(THINKING[i]["content"], add_special_tokens=False).input_ids)
        assert tok.decode(example.input_ids[start:]).startswith(reply)  # with its <think> block


def test_data_inspect_says_how_conversations_were_rendered(tmp_path):
    from rich.console import Console

    from tunelab.cli.inspect_data import inspect_data
    from tunelab.config.schema import Config

    tok = byte_bpe_tokenizer(REASONING_TEMPLATE)
    tok.save_pretrained(tmp_path / "tok")
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": THINKING}) + "\n")
    for supervise, phrase in (("assistant", "one example per assistant reply"),
                              ("last_turn", "its last assistant reply is supervised")):
        config = Config.model_validate({"model": {"name_or_path": str(tmp_path / "tok")}, "output_dir": str(tmp_path / "o"),
                                        "data": {"train": {"path": str(data)}, "supervise": supervise}})
        console = Console(record=True, width=200)
        inspect_data(config, 1, console)
        out = console.export_text()
        assert phrase in out and "replies_ending_with_end_of_turn" in out


# ---- 13.4 train ids == serve ids ---------------------------------------------------------------------

def serve_paths(tok, messages, tmp_path) -> dict[str, list[int]]:
    """The ids every serving path feeds the model to answer ``messages``."""
    batch = encode_prompts(tok, [messages, [{"role": "user", "content": "Hello there"}]])
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    rl = load_prompts(DataSource(path=str(path)), DataConfig(train=DataSource(path=str(path))), tok, 512)
    return {"chat, sample answers, generate-rejected (encode_prompts)": row, "RL prompts": rl.prompts[0].input_ids}


@pytest.mark.parametrize("name", ["bpe template+tokenizer BOS", "bpe tokenizer BOS only", "word gemma", "smollm2"])
def test_train_ids_equal_serve_ids_for_every_prefix(name, smollm2_tokenizer, tmp_path):
    tok = {"bpe template+tokenizer BOS": lambda: byte_bpe_tokenizer(LLAMA3_LIKE, adds_bos=True),
           "bpe tokenizer BOS only": lambda: byte_bpe_tokenizer(LLAMA3_LIKE_NO_BOS, adds_bos=True),
           "word gemma": lambda: word_tokenizer(GEMMA_LIKE), "smollm2": lambda: smollm2_tokenizer}[name]()
    [example] = tokenize(tok, {"messages": TWO_TURNS})
    reply_starts = [i for i in range(1, len(example.labels))
                    if example.labels[i] != IGNORE_INDEX and example.labels[i - 1] == IGNORE_INDEX]
    assert len(reply_starts) == 2
    for turn, start in zip((1, 3), reply_starts):
        trained = example.input_ids[:start]
        assert trained[:2].count(tok.bos_token_id) <= 1  # no double BOS
        for path, ids in serve_paths(tok, TWO_TURNS[:turn], tmp_path).items():
            assert ids == trained, path
        pair = PairTokenizer(tok, 512)({"prompt": TWO_TURNS[:turn], "chosen": "Fine.", "rejected": "No.",
                                        "margin": 0.0}, DataStats())
        assert pair.chosen_ids[:first_label(pair.chosen_labels)] == trained  # DPO / reward prompts too


# ---- 13.5 end-of-turn counted ------------------------------------------------------------------------

@pytest.mark.parametrize("make", [byte_bpe_tokenizer, word_tokenizer])
def test_replies_ending_with_the_templates_end_of_turn_are_counted(make):
    tok = make()
    assert tok.eos_token not in apply_template(tok, TWO_TURNS, False)  # end of turn is not EOS here
    stats = DataStats()
    tokenize(tok, {"messages": TWO_TURNS}, stats=stats)
    assert stats.num_replies == stats.num_ending_with_end_of_turn == 2
    assert stats.summary()["replies_ending_with_end_of_turn"] == 2
    stats = DataStats()  # a reply cut by truncation does not end with it
    Tokenizer(tok, 30, "truncate", "assistant")({"messages": TWO_TURNS}, stats)
    assert stats.num_replies == 2 and stats.num_ending_with_end_of_turn < 2


# ---- 15.10 data the loss cannot use ------------------------------------------------------------------

@pytest.mark.parametrize("make", [byte_bpe_tokenizer, word_tokenizer])
def test_unusable_conversations_are_dropped_with_a_reason(make):
    tok = make()
    stats = DataStats()
    for messages in ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}],
                     TWO_TURNS[:3], TWO_TURNS[:1]):
        assert tokenize(tok, {"messages": messages}, stats=stats) == []
    assert tokenize(tok, {"prompt": "Hi", "completion": ""}, stats=stats) == []
    assert stats.dropped == {"empty assistant reply": 2, "conversation ends with a user turn": 1,
                             "no assistant reply": 1}


def test_a_file_whose_every_reply_is_empty_is_an_error_naming_it(tmp_path):
    from tunelab.data.pipeline import prepare_data
    from tunelab.errors import DataError

    path = tmp_path / "empty_replies.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": ""}) + "\n" for i in range(3)))
    with pytest.raises(DataError, match=r"empty_replies\.jsonl.*empty completion"):
        prepare_data(DataConfig(train=DataSource(path=str(path))), byte_bpe_tokenizer(template=None), 0)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n")
    with pytest.raises(DataError, match=r"empty_replies\.jsonl: no held-out"):  # a validation file too
        prepare_data(DataConfig(train=DataSource(path=str(good)), validation=DataSource(path=str(path))),
                     byte_bpe_tokenizer(template=None), 0)
    from tunelab.data.preference import prepare_pairs

    pairs = tmp_path / "empty_pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi", "chosen": " ", "rejected": "No"}) + "\n")
    with pytest.raises(DataError, match=r"empty_pairs\.jsonl.*empty chosen reply"):
        prepare_pairs(DataConfig(train=DataSource(path=str(pairs))), byte_bpe_tokenizer(), 0)


def test_empty_directories_are_refused_and_a_utf8_bom_is_accepted(tmp_path):
    from tunelab.data.sources import load_records
    from tunelab.errors import DataError

    (tmp_path / "data.jsonl").mkdir()  # a directory is a folder of text files (data/text_files.py): here, none
    with pytest.raises(DataError, match="matched no files"):
        load_records(DataSource(path=str(tmp_path / "data.jsonl")))
    record = {"prompt": "Hi", "completion": "Hello"}
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(record).encode() + b"\n")
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([record]).encode())
    for name in ("bom.jsonl", "bom.json"):
        assert load_records(DataSource(path=str(tmp_path / name))) == [record]


def test_a_template_installed_on_a_bos_tokenizer_keeps_one_bos():
    from tunelab.data.templates import resolve_chat_template

    tok = byte_bpe_tokenizer(None, adds_bos=True)  # pre-trained with BOS; the installed template writes none
    resolve_chat_template(tok, LLAMA3_LIKE_NO_BOS)
    [example] = tokenize(tok, {"messages": TWO_TURNS[:2]})
    served = encode_prompts(tok, [TWO_TURNS[:1]])["input_ids"][0].tolist()
    assert example.input_ids[0] == served[0] == tok.bos_token_id
    assert example.input_ids[1] != tok.bos_token_id and served == example.input_ids[:len(served)]
