"""Tiny SFT runs for the board's tests: a Q/A data file and a LoRA config on a local tiny model."""

from __future__ import annotations

import json
from pathlib import Path


def write_data(root: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(24)]
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_config(root: Path, model_dir: Path, data: Path, name: str, **train) -> Path:
    settings = {"max_steps": 6, "batch_size": 2, "grad_accum": 1, "threads": 1, "lr": 1e-3, "save_every": 3,
                "eval_every": 3, **train}
    config = {"model": {"name_or_path": str(model_dir)}, "output_dir": str(root / name),
              "data": {"train": {"path": str(data)}, "val_fraction": 0.25, "max_seq_len": 64},
              "lora": {"r": 4, "alpha": 8}, "train": settings,
              "eval": {"sample_questions": 2, "max_new_tokens": 8}}
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return path
