"""The optimizer loop every recipe runs: accumulate, normalize, clip, step, log, evaluate, save.

A recipe supplies:
  * a :class:`BatchPlan`: deterministic micro-batches for each epoch (so a resumed run sees
    exactly the batches the uninterrupted run would),
  * ``count_units(batch) -> int``: how many loss units (supervised tokens, examples, pairs) a
    micro-batch holds,
  * ``compute_loss(model, batch, normalizer) -> (loss, metrics)``: the micro-batch's loss
    already divided by ``normalizer``, the unit count of the whole accumulated batch.
Dividing by the accumulated count (not averaging micro-batch means) makes one optimizer step
over 8 micro-batches of 1 identical to one step over a batch of 8, whatever their lengths.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from tunelab.config.schema import TrainConfig
from tunelab.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
from tunelab.training.metrics import MetricsLog
from tunelab.training.optim import build_optimizer, build_scheduler
from tunelab.training.precision import autocast

Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class BatchPlan:
    """Micro-batches per epoch; ``make_epoch(epoch)`` must be deterministic in ``epoch``."""

    micro_batches_per_epoch: int
    make_epoch: Callable[[int], list[Batch]]


@dataclass
class FitResult:
    """What :func:`fit` did: final state and every logged record."""

    state: TrainState
    history: list[dict[str, Any]]


def total_steps(plan: BatchPlan, cfg: TrainConfig) -> int:
    """Optimizer steps the run will take (``max_steps`` or ``epochs`` worth of micro-batches)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * plan.micro_batches_per_epoch / cfg.grad_accum))


def fit(
    model: nn.Module, plan: BatchPlan, compute_loss: LossFn, count_units: Callable[[Batch], int],
    cfg: TrainConfig, output_dir: Path, config_yaml: str, *, evaluate: Callable[[], dict[str, float]] | None = None,
    resume_from: Path | None = None, device: torch.device = torch.device("cpu"), quiet: bool = False,
) -> FitResult:
    """Train ``model`` in place; writes ``metrics.jsonl`` and checkpoints under ``output_dir``."""
    optimizer = build_optimizer(model, cfg)
    num_steps = total_steps(plan, cfg)
    scheduler = build_scheduler(optimizer, cfg, num_steps)
    state = TrainState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer, scheduler)
    log = MetricsLog(output_dir / "metrics.jsonl", resume_step=state.step if resume_from else None)
    batches = _BatchStream(plan)
    model.train()
    with _progress(quiet) as progress:
        task = progress.add_task("train", total=num_steps, completed=state.step, info="")
        while state.step < num_steps:
            micro = [batches.get(state.micro_batches + i) for i in range(cfg.grad_accum)]
            started = time.perf_counter()
            record = _optimizer_step(model, micro, compute_loss, count_units, optimizer, cfg, device)
            scheduler.step()
            state.step += 1
            state.micro_batches += cfg.grad_accum
            elapsed = time.perf_counter() - started
            record.update(step=state.step, epoch=round(state.micro_batches / plan.micro_batches_per_epoch, 3),
                          lr=optimizer.param_groups[0]["lr"], step_s=round(elapsed, 4),
                          tokens_per_s=round(record["tokens"] / elapsed, 1))
            if state.step % cfg.log_every == 0 or state.step == num_steps:
                log.write(record)
            progress.update(task, advance=1, info=f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                            f"{record['tokens_per_s']:.0f} tok/s")
            if evaluate and cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < num_steps:
                _log_eval(evaluate, model, log, state.step, progress)
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < num_steps:
                save_checkpoint(output_dir, model, optimizer, scheduler, state, config_yaml, cfg.keep_last)
    if evaluate:
        _log_eval(evaluate, model, log, state.step, None if quiet else progress)
    save_checkpoint(output_dir, model, optimizer, scheduler, state, config_yaml, cfg.keep_last)
    return FitResult(state=state, history=log.read())


def _optimizer_step(model, micro, compute_loss, count_units, optimizer, cfg, device) -> dict[str, Any]:
    normalizer = sum(count_units(b) for b in micro)
    if normalizer == 0:
        raise RuntimeError("an accumulated batch has no supervised units; the data pipeline should have dropped it")
    total_loss, tokens, sums = 0.0, 0, {}
    for batch in micro:
        tokens += int(batch.get("num_tokens", 0))
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with autocast(cfg.precision, device):
            loss, metrics = compute_loss(model, tensors, normalizer)
        loss.backward()
        total_loss += float(loss.detach())
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if cfg.max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
    else:
        grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    record = {"loss": round(total_loss, 6), "grad_norm": round(grad_norm, 4), "tokens": tokens, "units": normalizer}
    record.update({k: v for k, v in sums.items() if k not in ("nll_sum", "num_tokens")})
    return record


def _log_eval(evaluate, model, log: MetricsLog, step: int, progress) -> None:
    model.eval()
    with torch.no_grad():
        metrics = evaluate()
    model.train()
    log.write({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
    if progress is not None:
        progress.console.print(f"[bold]eval[/] step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


class _BatchStream:
    """Micro-batch ``i`` of the run, building each epoch's plan once when first needed."""

    def __init__(self, plan: BatchPlan):
        self.plan, self.epoch, self.batches = plan, -1, []

    def get(self, index: int) -> Batch:
        epoch, offset = divmod(index, self.plan.micro_batches_per_epoch)
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, self.plan.make_epoch(epoch)
        return self.batches[offset]


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("[bold blue]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), disable=quiet,
    )
