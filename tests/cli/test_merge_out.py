"""`tunelab merge RUN --out DIR [--overwrite]` (issue 15 item 1): the old code deleted DIR whatever it held
(a source tree, the run itself); now only an earlier tunelab merge/export holding nothing else is replaced.
Also: errors go to stderr, stdout stays the command's output (item 9)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tunelab.cli.app import app
from tunelab.errors import OutputError
from tunelab.training.outputs import MARKER, read_marker
from tests.conftest import make_tiny_llama


@pytest.fixture
def lora_run(tmp_path, smollm2_tokenizer):
    """A LoRA run directory (PEFT layout + tokenizer + tunelab.json) on a tiny local base model."""
    from tunelab.adapters.lora import inject_lora
    from tunelab.models.run import save_run

    base = tmp_path / "base"
    model = make_tiny_llama()
    model.save_pretrained(base)
    smollm2_tokenizer.save_pretrained(base)
    inject_lora(model, ["q_proj", "v_proj"], 4, 8, 0.0, False)
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    save_run(run, model, smollm2_tokenizer, method="lora", base_model=str(base), config_yaml="{}", results={})
    return run


def merge(run, out, *extra):
    return CliRunner().invoke(app, ["merge", str(run), "--out", str(out), *extra])


def snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_merge_overwrite_onto_a_source_tree_is_refused_and_the_tree_is_intact(tmp_path, lora_run):
    tree = tmp_path / "project"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "main.py").write_text("print('mine')\n")
    (tree / "README.md").write_text("# mine\n")
    before = snapshot(tree)
    result = merge(lora_run, tree, "--overwrite")
    assert isinstance(result.exception, OutputError), result.output
    assert "not written by tunelab" in str(result.exception) and "README.md, src" in str(result.exception)
    assert snapshot(tree) == before


def test_merge_overwrite_never_replaces_the_run_or_a_parent_of_it(lora_run):
    before = snapshot(lora_run)
    for target in (lora_run, lora_run.parent):
        result = merge(lora_run, target, "--overwrite")
        assert isinstance(result.exception, OutputError), result.output
        assert "which this command reads" in str(result.exception)
    assert snapshot(lora_run) == before


def test_merge_replaces_only_its_own_earlier_output(tmp_path, lora_run):
    out = tmp_path / "merged"
    assert merge(lora_run, out).exit_code == 0
    marker = read_marker(out)
    assert marker["kind"] == "merged" and "model.safetensors" in marker["files"] and MARKER not in marker["files"]
    refused = merge(lora_run, out)
    assert isinstance(refused.exception, OutputError) and "pass --overwrite" in str(refused.exception)
    assert merge(lora_run, out, "--overwrite").exit_code == 0
    (out / "notes.txt").write_text("mine")
    refused = merge(lora_run, out, "--overwrite")
    assert isinstance(refused.exception, OutputError) and "notes.txt" in str(refused.exception)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()


def test_errors_go_to_stderr_and_stdout_stays_clean(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tunelab", "config", "show", str(tmp_path / "missing.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "error:" in result.stderr and "missing.yaml" in result.stderr and "Traceback" not in result.stderr
