"""Next-line exact match (issue 18 item 2) on a tiny Llama and the toy byte-level BPE tokenizer.

Fails on the old code: there was no next-line eval.
"""

from __future__ import annotations

import torch

from tests.conftest import make_tiny_llama
from tests.toy_tokenizers import byte_bpe_tokenizer
from tunelab.eval.next_line import next_line_cases, next_line_exact_match, predicted_line, same_line

SOURCE = '''import os


@decorator
def capital(country):
    """Docstring line one.

    Docstring line two.
    """
    if country == "France":

        return "Paris"
    return "Madrid"


class Printer:
    def tray(self):
        return self.paper
'''


def test_cases_are_body_lines_with_the_function_source_before_them():
    cases = next_line_cases([{"text": SOURCE, "source": "mod.py"}, {"text": "not python (", "source": "x.txt"}], 100)
    lines = SOURCE.split("\n")
    assert [c.lineno for c in cases] == [10, 12, 13, 18]  # no docstring, no blank line, no def, nothing outside
    for case in cases:
        assert case.source == "mod.py" and case.target == lines[case.lineno - 1]
        start = 4 if case.lineno < 18 else 17  # from the decorator / the method's def
        assert case.prompt == "\n".join(lines[start - 1: case.lineno - 1]).rstrip()  # no trailing blank line
    # a fixed sample: the same subset whatever the document order, and a prefix-stable choice
    docs = [{"text": SOURCE.replace("capital", f"capital{i}"), "source": f"m{i}.py"} for i in range(6)]
    sample = next_line_cases(docs, 7)
    assert len(sample) == 7 and sample == next_line_cases(docs[::-1], 7)
    assert set(next_line_cases(docs, 3)) <= set(sample)


def test_predicted_line_and_match_rule():
    assert predicted_line(':\n    return "Paris"\n    x') == '    return "Paris"'
    assert predicted_line(" x") == "" and predicted_line("\n  y") == "  y" and predicted_line("\n\n \n z\n") == " z"
    assert same_line('  return "Paris"  ', 'return "Paris"') and not same_line("return 'Paris'", 'return "Paris"')


def _memorize(tokenizer, text, steps=200):
    model = make_tiny_llama(seed=0, vocab_size=len(tokenizer))
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


def test_a_model_that_memorized_the_file_matches_every_line_in_padded_batches():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is ~10x faster than two on a busy machine
    try:
        _check_memorized()
    finally:
        torch.set_num_threads(threads)


def _check_memorized():
    tok = byte_bpe_tokenizer()
    text = 'def f(a):\n    b = a + 1\n    c = b * 2\n    return c\n'
    cases = next_line_cases([{"text": text, "source": "f.py"}], 10)
    assert [c.target for c in cases] == ["    b = a + 1", "    c = b * 2", "    return c"]
    untrained = next_line_exact_match(make_tiny_llama(vocab_size=len(tok)), tok, cases, max_new_tokens=24,
                                      max_prompt_tokens=200)
    assert untrained["next_line_exact_match"] == 0.0 and untrained["num_lines"] == 3
    model, loss = _memorize(tok, text)
    assert loss < 0.05
    for batch_size in (1, 3):  # 3: prompts of different lengths, left-padded into one batch
        result = next_line_exact_match(model, tok, cases, max_new_tokens=24, max_prompt_tokens=200,
                                       batch_size=batch_size)
        assert result["next_line_exact_match"] == 1.0 and result["num_correct"] == 3, result["examples"]
    wrong = [type(c)(c.source, c.lineno, c.prompt, c.target + " + 0") for c in cases]
    assert next_line_exact_match(model, tok, wrong, max_new_tokens=24, max_prompt_tokens=200)["num_correct"] == 0
