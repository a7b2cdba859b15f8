"""``data.system_prompt: default | none | <text>`` (issue 15, "Also"): applied to the chat template,
so training, chat / sample answers (encode_prompts), RL prompts and the saved tokenizer agree."""

from __future__ import annotations

import copy
import json

import pytest

from tests.toy_tokenizers import LLAMA3_LIKE, LLAMA3_LIKE_DEFAULT_SYSTEM, byte_bpe_tokenizer
from tunelab.config.schema import DataConfig, DataSource
from tunelab.data.templates import CHATML, apply_template, resolve_chat_template
from tunelab.data.tokenize import IGNORE_INDEX, DataStats, Tokenizer
from tunelab.errors import DataError
from tunelab.models.generate import encode_prompts
from tunelab.rollout.prompts import load_prompts

SMOL_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Paris"}]


def resolved(tok, option, chat_template=None):
    tok = copy.deepcopy(tok)
    resolve_chat_template(tok, chat_template, option)
    return tok


def trained_prefix(tok) -> list[int]:
    [example] = Tokenizer(tok, 512, "truncate", "assistant")({"messages": CHAT}, DataStats())
    return example.input_ids[: next(i for i, l in enumerate(example.labels) if l != IGNORE_INDEX)]


@pytest.mark.parametrize("option, expected", [("default", SMOL_DEFAULT), ("none", None), ("Be brief.", "Be brief.")])
def test_smollm2_system_prompt_option_is_the_same_in_training_and_serving(smollm2_tokenizer, tmp_path, option,
                                                                            expected):
    from tunelab.models.loading import load_tokenizer

    tok = resolved(smollm2_tokenizer, option)
    train_text = tok.decode(trained_prefix(tok))
    if expected is None:
        assert "system" not in train_text and SMOL_DEFAULT not in train_text
    else:
        assert f"<|im_start|>system\n{expected}<|im_end|>" in train_text
        assert (SMOL_DEFAULT in train_text) == (option == "default")
    chat_ids = encode_prompts(tok, [CHAT[:1]])["input_ids"][0].tolist()
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Hello there"}) + "\n")
    rl_ids = load_prompts(DataSource(path=str(path)), DataConfig(train=DataSource(path=str(path))), tok, 512)
    assert chat_ids == rl_ids.prompts[0].input_ids == trained_prefix(tok)
    tok.save_pretrained(tmp_path / "run")  # what chat and other servers read from a run
    assert apply_template(load_tokenizer(str(tmp_path / "run")), CHAT, False) == apply_template(tok, CHAT, False)
    own = [{"role": "system", "content": "Mine."}, *CHAT]  # a conversation's own system prompt always wins
    assert apply_template(tok, own, False) == apply_template(smollm2_tokenizer, own, False)


def test_toy_template_default_removed_or_replaced_and_chatml_left_alone():
    tok = byte_bpe_tokenizer(LLAMA3_LIKE_DEFAULT_SYSTEM)
    assert "You are a toy helper." in apply_template(resolved(tok, "default"), CHAT, False)
    assert apply_template(resolved(tok, "none"), CHAT, False) == apply_template(byte_bpe_tokenizer(LLAMA3_LIKE), CHAT,
                                                                               False)
    replaced = apply_template(resolved(tok, "Be brief."), CHAT, False)
    assert "Be brief." in replaced and "toy helper" not in replaced
    plain = byte_bpe_tokenizer(CHATML)
    assert apply_template(resolved(plain, "none"), CHAT, False) == apply_template(plain, CHAT, False)
    assert apply_template(resolved(plain, "Q \"x\"\n"), CHAT, False).startswith(
        "<|im_start|>system\nQ \"x\"\n<|im_end|>")


def test_none_is_refused_when_the_default_cannot_be_removed():
    hidden = ("{% set d = 'You are ' + 'hidden.' %}{% if messages[0]['role'] != 'system' %}{{ 'system: ' + d + '\\n' }}"
              "{% endif %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(DataError, match="data.system_prompt: none"):
        resolved(byte_bpe_tokenizer(hidden), "none")


def test_null_means_default():
    assert DataConfig(train=DataSource(path="x.jsonl"), system_prompt=None).system_prompt == "default"
    assert DataConfig(train=DataSource(path="x.jsonl")).system_prompt == "default"
