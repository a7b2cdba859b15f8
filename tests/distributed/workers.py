"""Training jobs shared by the 1-process reference and the 2-process (gloo, CPU) runs.

A job is a plain dict so it pickles into spawned workers: strategy, method, per-rank batch size,
grad_accum, packing, steps, checkpoint cadence, optional resume path, gradient checkpointing and
train.compile.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from tests.conftest import make_tiny_llama
from tunelab.config.distributed import DistributedConfig
from tunelab.config.schema import Config, TrainConfig
from tunelab.data.batching import sft_batch_plan
from tunelab.data.tokenize import TokenizedExample
from tunelab.models.causal_lm import lm_loss
from tunelab.recipes.prepare import enable_gradient_checkpointing, setup_trainable
from tunelab.training.distributed import init_distributed
from tunelab.training.loop import fit


def variable_length_examples(n: int = 40, seed: int = 0) -> list[TokenizedExample]:
    """Examples of 5..40 tokens whose prompt (unsupervised) part also varies, so per-rank token
    counts differ and a per-rank normalization would give a different loss."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(5, 41, (1,), generator=gen))
        ids = torch.randint(3, 97, (length,), generator=gen).tolist()
        prompt = int(torch.randint(1, length - 2, (1,), generator=gen))
        out.append(TokenizedExample(ids, [-100] * prompt + ids[prompt:]))
    return out


def run_job(job: dict, runtime=None) -> dict:
    """Train the tiny Llama as ``job`` says; returns logged losses and (rank 0) the final weights."""
    torch.manual_seed(0)
    model = make_tiny_llama(seed=0)
    config = Config.model_validate({"model": {"name_or_path": "x"}, "data": {"train": {"path": "x"}},
                                    "train": {"method": job["method"]}, "lora": {"r": 4, "alpha": 8}})
    setup_trainable(model, config)
    if job.get("gradient_checkpointing"):
        enable_gradient_checkpointing(model)
    cfg = TrainConfig(max_steps=job["steps"], batch_size=job["batch_size"], grad_accum=job["grad_accum"], lr=1e-3,
                      warmup_steps=1, save_every=job.get("save_every"), keep_last=5, max_grad_norm=0.5,
                      compile=job.get("compile", False))
    plan = sft_batch_plan(variable_length_examples(), batch_size=cfg.batch_size, max_seq_len=64,
                          packing=job["packing"], shuffle=True, seed=0, pad_token_id=0)
    resume = Path(job["resume_from"]) if job.get("resume_from") else None
    result = fit(model, plan, lambda m, b, n: lm_loss(m, b, n, chunk_size=16), lambda b: b["num_supervised"], cfg,
                 Path(job["output_dir"]), "cfg", resume_from=resume, quiet=True, runtime=runtime)
    losses = {r["step"]: r["loss"] for r in result.history if "loss" in r}
    units = {r["step"]: r["units"] for r in result.history if "units" in r}
    context = runtime.full_weights() if runtime is not None else _nothing()
    with context:
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"losses": losses, "units": units, "weights": weights}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def join_gloo(rank: int, world_size: int, port: int) -> None:
    """Join a local gloo group the way torchrun would (its environment variables), one thread per rank."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")


def worker(rank: int, world_size: int, port: int, jobs: list[dict], out_dir: str) -> None:
    """One of ``world_size`` processes: joins a gloo group the way torchrun would and runs ``jobs`` in order."""
    join_gloo(rank, world_size, port)
    try:
        for job in jobs:
            runtime = init_distributed(DistributedConfig(strategy=job["strategy"]))
            assert runtime.world_size == world_size and not runtime.owns_group
            result = run_job(job, runtime)
            if rank == 0:
                torch.save(result, Path(out_dir) / f"{job['name']}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()
