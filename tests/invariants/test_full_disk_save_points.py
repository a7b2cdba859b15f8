"""A full disk at each save point of a real SFT run (a write wrapper raising ENOSPC when a file whose path
holds the given name is written): one OutputError naming the path and the cause, and what was written
before is intact (issue 15 item 8 and its proof). The old code raised a raw OSError / SafetensorError
traceback, and truncated metrics.jsonl before rewriting it on --resume."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os

import pytest
import torch

from tunelab.config.load import validate_config
from tunelab.errors import OutputError
from tests.conftest import make_tiny_llama

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def base(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("full-disk")
    model = make_tiny_llama(vocab_size=len(smollm2_tokenizer))
    model.save_pretrained(root / "model")
    smollm2_tokenizer.save_pretrained(root / "model")
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(12)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config(base, output_dir):
    return validate_config({
        "model": {"name_or_path": str(base / "model")}, "output_dir": str(output_dir),
        "data": {"train": {"path": str(base / "data.jsonl")}, "max_seq_len": 96, "val_fraction": 0.25},
        "lora": {"r": 2, "alpha": 4},
        "train": {"max_steps": 4, "batch_size": 2, "grad_accum": 1, "save_every": 2, "keep_last": 5, "threads": 1},
        "eval": {"sample_questions": 0, "batch_size": 4}})


def fill_disk_at(monkeypatch, name: str) -> None:
    """Every write of a file whose path contains ``name`` fails with ENOSPC (open, torch.save, safetensors)."""
    from tunelab.adapters import peft_format
    from tunelab.training import checkpoint

    real_open, real_save, real_save_file = builtins.open, torch.save, checkpoint.save_file

    def full(path) -> bool:
        return name in str(path)

    def fake_open(file, mode="r", *args, **kwargs):
        if full(file) and any(c in mode for c in "wax+"):
            raise ENOSPC
        return real_open(file, mode, *args, **kwargs)

    def fake_save(obj, f, *args, **kwargs):
        if full(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")
        return real_save(obj, f, *args, **kwargs)

    def fake_save_file(tensors, filename, *args, **kwargs):
        if full(filename):
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(torch, "save", fake_save)
    monkeypatch.setattr(checkpoint, "save_file", fake_save_file)
    monkeypatch.setattr(peft_format, "save_file", fake_save_file)


@pytest.mark.parametrize("name, expected, kept", [
    ("before_training", "while writing {run}/before_training.json", []),
    ("metrics.jsonl", "while writing {run}/metrics.jsonl", ["before_training.json"]),
    ("step-000002", "while writing checkpoints/step-000002 in {run}", ["metrics.jsonl"]),
    ("step-000004", "while writing checkpoints/step-000004 in {run}", ["checkpoints/step-000002/state.json"]),
    ("adapter_model", "while writing {run}", ["checkpoints/step-000004/state.json"]),
])
def test_a_full_disk_at_each_save_point_is_one_error_naming_it_and_earlier_files_are_intact(
        base, tmp_path, monkeypatch, name, expected, kept):
    from tunelab.recipes.sft import train

    run = tmp_path / "run"
    fill_disk_at(monkeypatch, name)
    with pytest.raises(OutputError) as err:
        train(config(base, run))
    message = str(err.value)
    assert message.startswith("no space left on device " + expected.format(run=run)), message
    for path in kept:
        assert (run / path).is_file(), path
    assert not list(run.glob("**/.tmp-*"))  # nothing half written left behind
    if name == "step-000004":  # space freed: the run finishes from its last intact checkpoint
        monkeypatch.undo()
        results = train(config(base, run), resume=True)
        assert results["steps"] == 4 and (run / "tunelab.json").is_file()
