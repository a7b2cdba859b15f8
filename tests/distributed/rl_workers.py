"""GRPO and PPO jobs for the 1-process reference and the 2-process (gloo, CPU) runs of the real recipes.

A job is a plain dict (it pickles into spawned workers): ``task``, ``name``, ``output_dir``, the config
overrides it needs, ``sigterm_at_step`` (rank 0 sends itself SIGTERM during that step: both ranks must
stop after it and write one checkpoint) and ``resume``.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console

from tunelab.config.load import validate_config
from tunelab.training.interrupt import RunInterrupted

STEP_FN = {"grpo": "grpo_step", "ppo": "ppo_step"}


def rl_config(job: dict, world_size: int):
    """The job's config; ``batch_size``/``mini_batch_size`` are per rank, so a 1-process reference of a
    2-rank job passes ``world_size=1`` with both doubled by the caller."""
    # a random tiny model never answers right and never stops within 5 tokens: the regex term (a capital
    # letter somewhere) is what makes rewards differ within groups
    rewards = [{"type": "exact_match"}, {"type": "length_penalty", "max_tokens": 2, "weight": 0.5},
               {"type": "regex", "pattern": "[A-Z]", "mode": "search"}]
    rl = {"num_generations": 2, "max_new_tokens": 5, "max_prompt_len": 128, "rewards": rewards, "eval_prompts": 2,
          "mini_batch_size": job["mini_batch_size"], "micro_batch_size": job.get("micro_batch_size"),
          "ppo_epochs": 2, "log_samples_every": 1, **job.get("rl", {})}
    return validate_config({
        "task": job["task"], "output_dir": job["output_dir"], "model": {"name_or_path": job["model_dir"]},
        "data": {"train": {"path": "builtin:arithmetic", "name": "add", "split": "train"}, "max_examples": 24,
                 "val_fraction": 0.1},
        "lora": {"r": 4, "alpha": 8}, "distributed": {"strategy": job["strategy"] if world_size > 1 else "none"},
        "train": {"method": job.get("method", "lora"), "max_steps": job.get("steps", 4), "batch_size": job["batch_size"],
                  "lr": 1e-2, "threads": 1, "save_every": job.get("save_every"), "keep_last": 5},
        "eval": {"batch_size": 4, "before_training": False},
        "rl": rl,
    })


def run_job(job: dict, world_size: int = 1) -> None:
    """Train as ``job`` says (the real recipe); a SIGTERM-stopped job returns after its checkpoint."""
    recipe = importlib.import_module(f"tunelab.recipes.{job['task']}")
    config = rl_config(job, world_size)
    real_step = getattr(recipe, STEP_FN[job["task"]])

    def step(*args, **kwargs):
        if kwargs.get("step") == job.get("sigterm_at_step", -1) - 1 and int(os.environ.get("RANK", "0")) == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # rank 0 only: the stop flag must reach rank 1 too
        return real_step(*args, **kwargs)

    setattr(recipe, STEP_FN[job["task"]], step)
    try:
        recipe.train(config, resume=job.get("resume"), console=Console(quiet=True))
    except RunInterrupted as stop:
        Path(job["output_dir"], f"stopped-rank{os.environ.get('RANK', '0')}.json").write_text(
            json.dumps({"step": stop.step, "checkpoint": str(stop.checkpoint)}))
    finally:
        setattr(recipe, STEP_FN[job["task"]], real_step)


def worker(rank: int, world_size: int, port: int, jobs: list[dict]) -> None:
    """One of ``world_size`` processes: joins a gloo group the way torchrun would and runs ``jobs`` in order."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for job in jobs:
            run_job(job, world_size)
            dist.barrier()
    finally:
        dist.destroy_process_group()
