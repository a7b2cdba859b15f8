"""Issue 18 items 1-2: continued pre-training on a glob of Python files through the SFT recipe, with the
next-line eval in its before/after results, on a tiny Llama; and the shipped click config. Fails on the old
code (no text-file sources, no eval.next_line_samples)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console

from tunelab.config.load import load_config, validate_config
from tunelab.data.text_files import split_files
from tunelab.errors import DataError

ROOT = Path(__file__).resolve().parents[3]
FUNCTION = "def f{i}(a):\n    b = a + {i}\n    if b:\n        return b * 2\n    return None\n"


@pytest.fixture
def tiny_dir(tmp_path, smollm2_tokenizer):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(vocab_size=len(smollm2_tokenizer))
    model.config.pad_token_id = smollm2_tokenizer.pad_token_id
    model.save_pretrained(tmp_path / "tiny")
    smollm2_tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def _config(tmp_path, model_dir, **eval_keys):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for i in range(4):
        (src / f"m{i}.py").write_text(FUNCTION.format(i=i) * 2)
    return validate_config({
        "output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(model_dir)},
        "data": {"train": {"path": f"{src}/*.py"}, "val_fraction": 0.5, "max_seq_len": 32},
        "lora": {"r": 2, "alpha": 4}, "train": {"max_steps": 1, "batch_size": 2, "grad_accum": 1, "threads": 1},
        "eval": {"sample_questions": 0, "max_new_tokens": 4, "batch_size": 4, **eval_keys}})


def test_sft_on_a_glob_reports_next_line_exact_match_before_and_after(tmp_path, tiny_dir):
    from tunelab.recipes.sft import train

    threads = torch.get_num_threads()
    try:
        results = train(_config(tmp_path, tiny_dir, next_line_samples=5), console=Console(quiet=True))
    finally:
        torch.set_num_threads(threads)
    before, after = results["next_line_before"], results["next_line_after"]
    assert before["num_lines"] == after["num_lines"] == 5 and 0 <= after["next_line_exact_match"] <= 1
    assert {e["source"] for e in after["examples"]} <= {f"{tmp_path}/src/m{i}.py" for i in range(4)}
    assert results["held_out_data"]["files"] == 2 and results["train"]["files"] == 2
    with pytest.raises(DataError, match="eval.next_line_samples=5: no held-out document"):
        config = _config(tmp_path, tiny_dir, next_line_samples=5)
        for path in (tmp_path / "src").iterdir():
            path.write_text(f"plain prose, not code {path.name}\n")
        train(config, overwrite=True, console=Console(quiet=True))


def test_click_config_holds_out_whole_files_of_the_installed_package():
    config = load_config(ROOT / "configs" / "cpt" / "click-code.yaml")
    assert config.data.train.path.startswith("package:click/") and config.eval.next_line_samples > 0
    train, held = split_files(config.data.train.path, config.data.val_fraction)
    assert held and train and not {f.key for f in train} & {f.key for f in held}
    assert all(f.key.endswith(".py") for f in train + held)
