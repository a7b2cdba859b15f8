"""Issue 13 item 6: generation stops where the template ends a turn, and saved models say so.

Stop ids are read from each template (ChatML of the real SmolLM2 tokenizer, a Gemma-style template on
a word-level vocabulary, a Llama-3-style template on byte-level BPE), every generation path stops
there, and run directories / merged models carry them in ``generation_config.json`` and ``config.json``.
"""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from tests.artifact_fixtures import GEMMA_STYLE, bpe_tokenizer, make_tiny_qwen2, script_model, word_tokenizer
from tests.conftest import make_tiny_llama
from tunelab.adapters.lora import inject_lora
from tunelab.data.stop_tokens import stop_token_ids
from tunelab.models.generate import generate_replies
from tunelab.models.run import save_run

HELLO = [{"role": "user", "content": "hello"}]


def test_stop_ids_are_read_from_each_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    word = word_tokenizer()
    assert stop_token_ids(word) == sorted(word.convert_tokens_to_ids(["</s>", "<end_of_turn>"]))
    bpe = bpe_tokenizer()
    assert stop_token_ids(bpe) == sorted(bpe.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"]))
    # a marker of several ordinary tokens cannot be a stop id: EOS alone
    plain = word_tokenizer(chat_template=GEMMA_STYLE.replace("<end_of_turn>", " the end"))
    assert stop_token_ids(plain) == [plain.eos_token_id]
    plain.chat_template = None
    assert stop_token_ids(plain) == [plain.eos_token_id]


@pytest.mark.parametrize("family", ["word", "bpe"])
def test_generate_replies_stops_at_end_of_turn(family):
    """The reply ends at the template's end-of-turn token, not at EOS (which the script emits later)."""
    tok = word_tokenizer() if family == "word" else bpe_tokenizer()
    end = "<end_of_turn>" if family == "word" else "<|eot_id|>"
    word_ids = tok("hello world", add_special_tokens=False).input_ids
    script = [*word_ids, tok.convert_tokens_to_ids(end), *word_ids, tok.eos_token_id]
    model = script_model(make_tiny_llama(vocab_size=len(tok)), script)
    [reply] = generate_replies(model, tok, [HELLO], max_new_tokens=len(script))
    assert reply.replace(" ", "") == "helloworld"


def test_run_dirs_and_merged_models_carry_the_stop_ids(tmp_path):
    """Full run: generation_config.json + config.json list both ids and transformers' generate stops at
    <end_of_turn>; LoRA run: generation_config.json beside the adapter; merge: the merged folder too."""
    from typer.testing import CliRunner

    from tunelab.cli.app import app

    tok = word_tokenizer()
    want = sorted(tok.convert_tokens_to_ids(["</s>", "<end_of_turn>"]))
    base = make_tiny_qwen2(vocab_size=len(tok))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    save_run(tmp_path / "full", base, tok, method="full", base_model=str(tmp_path / "base"), config_yaml="",
             results={})
    assert GenerationConfig.from_pretrained(tmp_path / "full").eos_token_id == want
    assert AutoConfig.from_pretrained(tmp_path / "full").eos_token_id == want
    assert json.loads((tmp_path / "full" / "tunelab.json").read_text())["stop_ids"] == want
    reloaded = script_model(AutoModelForCausalLM.from_pretrained(tmp_path / "full"), [7, want[1], 8, 9])
    out = reloaded.generate(torch.tensor([[1, 4]]), max_new_tokens=4, do_sample=False)
    assert out[0, 2:].tolist() == [7, want[1]]  # transformers stops at <end_of_turn> from the saved files

    adapted = make_tiny_qwen2(vocab_size=len(tok))
    inject_lora(adapted, ["q_proj"], r=2, alpha=4)
    save_run(tmp_path / "lora", adapted, tok, method="lora", base_model=str(tmp_path / "base"), config_yaml="",
             results={})
    assert GenerationConfig.from_pretrained(tmp_path / "lora").eos_token_id == want
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert "stop ids" in result.output and "<end_of_turn>" in result.output
    assert GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id == want
    assert AutoConfig.from_pretrained(tmp_path / "merged").eos_token_id == want
