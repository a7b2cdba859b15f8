"""Whole recipe runs (classification, reward, DPO, KTO) shared by the 1-process reference and the
2-process (gloo, CPU) runs of tests/distributed/test_recipes.py.

A job is a plain dict (it pickles into spawned workers): ``name``, the raw config dict, and optionally
``interrupt_after`` (turn a finished run into one killed after that step's checkpoint, then resume it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tests.distributed.workers import join_gloo

WORDS = {"pos": ["great", "good", "wonderful", "helped"], "neg": ["awful", "bad", "terrible", "worse"],
         "neu": ["okay", "average", "unsure", "mixed"]}


def write_data(root: Path) -> dict[str, Path]:
    """Classification rows and preference pairs of varying lengths (so per-rank counts differ)."""
    names = sorted(WORDS)
    rows = [{"text": f"the drug was {WORDS[names[i % 3]][i % 4]} for me" + " really" * (i % 5), "label": names[i % 3]}
            for i in range(30)]
    pairs = [{"prompt": f"Question {i}: what should I do about error {i}?" + " Please." * (i % 3),
              "chosen": f"Restart service {i}." + " Then check the log." * (i % 4),
              "rejected": f"I am not sure what error {i} means, sorry." + " Ask someone." * (i % 2)} for i in range(22)]
    paths = {"rows": root / "rows.jsonl", "pairs": root / "pairs.jsonl", "held_pairs": root / "held_pairs.jsonl"}
    paths["rows"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["pairs"].write_text("".join(json.dumps(p) + "\n" for p in pairs[:15]))
    paths["held_pairs"].write_text("".join(json.dumps(p) + "\n" for p in pairs[15:]))
    return paths


def recipe_config(task: str, model_dir: Path, data: dict[str, Path], output_dir: Path, sections: dict, *,
                  strategy: str = "none", grad_accum: int = 1) -> dict:
    """A raw config for ``task`` (classification | reward | dpo | kto) on the tiny model: 4 steps, eval
    every 2 (the held-out set has more batches than ranks, and an odd count, so shares are uneven);
    ``sections`` are merged into the config's sections."""
    raw = {"task": "dpo" if task == "kto" else task, "output_dir": str(output_dir),
           "model": {"name_or_path": str(model_dir)},
           "train": {"max_steps": 4, "batch_size": 2, "grad_accum": grad_accum, "lr": 5e-3, "warmup_steps": 1,
                     "eval_every": 2, "save_every": 2, "keep_last": 5, "threads": 1, "max_grad_norm": 1.0},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "distributed": {"strategy": strategy},
           "eval": {"before_training": True, "batch_size": 2, "sample_questions": 0}}
    if task == "classification":
        raw["data"] = {"train": {"path": str(data["rows"])}, "val_fraction": 0.3, "max_seq_len": 32}
        raw["classification"] = {"text_field": "text", "label_field": "label"}
    else:
        raw["data"] = {"train": {"path": str(data["pairs"])}, "validation": {"path": str(data["held_pairs"])},
                       "max_seq_len": 64}
    if task == "kto":
        raw["preference"] = {"loss": "kto", "beta": 0.5}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def run_recipe(raw: dict, resume: bool = False) -> dict:
    """Validate ``raw`` and run its recipe quietly (every rank calls this under torchrun/spawn)."""
    from rich.console import Console

    from tunelab.config.load import validate_config
    from tunelab.recipes import get_recipe

    config = validate_config(raw)
    return get_recipe(config.task)(config, resume=resume, console=Console(quiet=True))


def collect(output_dir: Path) -> dict:
    """What the comparisons read from a finished run: per-step losses, evaluations, final weights, results."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    weights = {}
    for name in ("model.safetensors", "adapter_model.safetensors"):
        if (output_dir / name).is_file():
            weights.update(load_file(str(output_dir / name)))
    return {"losses": {r["step"]: r["loss"] for r in records if "loss" in r},
            "units": {r["step"]: r["units"] for r in records if "units" in r},
            "evals": {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")}
                      for r in records if any(k.startswith("eval/") for k in r)},
            "weights": weights, "results": json.loads((output_dir / "tunelab.json").read_text())["results"]}


def interrupt_after(output_dir: Path, step: int) -> None:
    """Make a finished run look killed right after its ``step`` checkpoint: later checkpoints and the
    final files go (``metrics.jsonl`` is trimmed by the resume itself)."""
    for path in (output_dir / "checkpoints").glob("step-*"):
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)
    (output_dir / "tunelab.json").unlink()


def worker(rank: int, world_size: int, port: int, jobs: list[dict], out_dir: str) -> None:
    """One of ``world_size`` processes: joins a gloo group as torchrun would, runs every job's recipe."""
    join_gloo(rank, world_size, port)
    try:
        for job in jobs:
            output_dir = Path(job["config"]["output_dir"])
            run_recipe(job["config"])
            if rank == 0:
                torch.save(collect(output_dir), Path(out_dir) / f"{job['name']}.pt")
            if "interrupt_after" in job:
                if rank == 0:
                    interrupt_after(output_dir, job["interrupt_after"])
                dist.barrier()
                run_recipe(job["config"], resume=True)
                if rank == 0:
                    torch.save(collect(output_dir), Path(out_dir) / f"{job['name']}-resumed.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()
