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

With a distributed :class:`~tunelab.training.distributed.Runtime` (torchrun, DDP or FSDP), a step
takes ``grad_accum × world_size`` micro-batches, each rank a disjoint round-robin share;
``normalizer`` is then the unit count of the whole step summed over all ranks, and gradients are
summed across ranks, so N ranks × batch b train exactly like 1 rank × batch N·b. Only rank 0 logs,
shows progress and writes metrics; checkpoints are sharded (see :mod:`tunelab.training.checkpoint`).

With ``train.metric_for_best`` every evaluation competes for the best checkpoint, early stopping may
end the run, and the best weights are loaded back at the end (:mod:`tunelab.training.selection`).
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import closing, nullcontext
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.config.schema import TrainConfig
from tunelab.errors import TunelabError
from tunelab.training.checkpoint import (
    TrainState, checkpoint_dir, clear_previous_run, load_checkpoint, load_trainable_weights, run_finished,
    save_checkpoint, saved_world_size,
)
from tunelab.training.compile import compiled_layers
from tunelab.training.distributed import Runtime, env_world_size, rank_micro_batches, single_process
from tunelab.training.interrupt import RunInterrupted, StopSignals
from tunelab.training.metrics import MetricsLog
from tunelab.training.optim import build_optimizer, build_scheduler, checked_step
from tunelab.training.outputs import writing_checkpoint
from tunelab.training.precision import autocast
from tunelab.training.progress import training_progress
from tunelab.training.resume import check_resumed_config
from tunelab.training.selection import BestTracker

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

    def held_out(self) -> dict[str, Any] | None:
        """Held-out metrics (``eval/`` prefix removed) of the weights ``fit`` left in the model: the
        evaluation at ``state.best_step`` with ``train.metric_for_best``, else the last one; None if none."""
        evals = [r for r in self.history if any(k.startswith("eval/") for k in r)]
        best = self.state.best_step
        chosen = next((r for r in reversed(evals) if best is None or r["step"] == best), None)
        return {k.removeprefix("eval/"): v for k, v in chosen.items() if k.startswith("eval/")} if chosen else None


def total_steps(plan: BatchPlan, cfg: TrainConfig, world_size: int = 1) -> int:
    """Optimizer steps the run will take (``max_steps``, or ``epochs`` worth of micro-batches at
    ``grad_accum × world_size`` micro-batches per step)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * plan.micro_batches_per_epoch / (cfg.grad_accum * world_size)))


def fit(
    model: nn.Module, plan: BatchPlan, compute_loss: LossFn, count_units: Callable[[Batch], int],
    cfg: TrainConfig, output_dir: Path, config_yaml: str, *, evaluate: Callable[[], dict[str, float]] | None = None,
    resume_from: Path | None = None, device: torch.device = torch.device("cpu"), quiet: bool = False,
    runtime: Runtime | None = None,
) -> FitResult:
    """Train ``model`` in place; writes ``metrics.jsonl`` and checkpoints under ``output_dir``.

    With ``cfg.compile`` the model's layers run ``torch.compile``-d for the whole loop, evaluations
    included (:mod:`tunelab.training.compile`); their eager forward is restored before ``fit`` returns.

    Args:
        runtime: from :func:`tunelab.training.distributed.init_distributed`; wraps ``model`` (DDP,
            FSDP) before the optimizer is built, and its ``device`` replaces ``device``. None = one
            process. Every rank calls ``fit`` with the same plan and config; ``evaluate`` runs on
            every rank (inside the wrapper).

    Returns:
        The final state and the logged records (the same on every rank). With ``cfg.metric_for_best``
        the model holds the best evaluation's weights (loaded from its checkpoint), not the last step's.

    Raises:
        TunelabError: launched with several processes but no ``runtime`` given; a resumed
            checkpoint does not fit the model or the batch size, or took another ``world_size × grad_accum``
            (:func:`check_same_step_size`), or its config differs in keys that cannot change
            (:func:`tunelab.training.resume.check_resumed_config`); the resumed run is already
            finished (its final files are there, after its last step or an early stop);
            ``cfg.metric_for_best`` without ``evaluate`` or naming a metric ``evaluate`` does not
            report; ``cfg.compile`` and ``torch.compile`` failed (the message names ``train.compile``).
        RunInterrupted: SIGTERM/SIGINT arrived (:mod:`tunelab.training.interrupt`); the step in
            progress was finished and checkpointed. A run resumed at its last step or after an early
            stop (stopped after its final checkpoint) does not train: it evaluates if that was not
            logged and returns, so the recipe writes the final files.
    """
    if runtime is None:
        if env_world_size() > 1:
            raise TunelabError("this recipe runs on one process only; launch it without torchrun")
        runtime = single_process(device)
    device = runtime.device
    wrapped = runtime.wrap(model)
    optimizer = build_optimizer(model, cfg)
    num_steps = total_steps(plan, cfg, runtime.world_size)
    scheduler = build_scheduler(optimizer, cfg, num_steps)
    tracker = BestTracker.from_config(cfg)
    if tracker is not None and evaluate is None:
        raise TunelabError(f"train.metric_for_best={cfg.metric_for_best} needs held-out data to evaluate: set "
                           "data.validation or data.val_fraction, or remove train.metric_for_best")
    batches = _BatchStream(plan)
    data_sha256 = batches.fingerprint()  # what the run trains on; a resume must train on the same
    state = TrainState(micro_batch_size=cfg.batch_size, micro_batches_per_step=cfg.grad_accum * runtime.world_size,
                       data_sha256=data_sha256, micro_batches_per_epoch=plan.micro_batches_per_epoch)
    if resume_from is not None:
        state = _resume(resume_from, model, optimizer, scheduler, cfg, runtime, config_yaml)
        check_same_data(resume_from, state, data_sha256, plan.micro_batches_per_epoch)
        _refuse_finished(resume_from, state, num_steps, output_dir)
    else:
        if runtime.is_main:
            clear_previous_run(output_dir)  # a fresh run replacing an old one (--overwrite): only now, after setup
        if runtime.world_size > 1:
            torch.manual_seed(cfg.seed + 1_000_003 * runtime.rank)  # different dropout masks per rank
    log = MetricsLog(output_dir / "metrics.jsonl", resume_step=state.step if resume_from else None,
                     report_to=cfg.report_to, config_yaml=config_yaml) if runtime.is_main else None

    model.train()
    # Resumed at the last step or after an early stop: the final files were never written (see _refuse_finished).
    finishing = state.step >= num_steps or state.stopped_early

    def save() -> Path:
        with writing_checkpoint(output_dir, state.step):  # a full disk: one clear error, nothing half written
            return save_checkpoint(output_dir, model, optimizer, scheduler, state, config_yaml, cfg.keep_last,
                                   runtime=runtime)

    stop = StopSignals()
    with stop, compiled_layers(model, cfg.compile), training_progress(quiet or not runtime.is_main) as progress, \
            closing(log) if log else nullcontext():  # trackers (train.report_to) finish, also on a stop
        task = progress.add_task("train", total=num_steps, completed=state.step, info="")
        if tracker is not None and runtime.is_main and resume_from is None and (cfg.eval_every or 0) >= num_steps:
            progress.console.print(  # metric_for_best would choose among one evaluation: say so, do not fail
                f"[yellow]warning:[/] train.eval_every={cfg.eval_every} is not below the run's {num_steps} optimizer "
                f"steps ({plan.micro_batches_per_epoch} micro-batches per epoch, train.grad_accum={cfg.grad_accum}"
                f"{f' x {runtime.world_size} ranks' if runtime.world_size > 1 else ''}): held-out evaluation runs only "
                f"at the end, so train.metric_for_best={cfg.metric_for_best} selects nothing; lower train.eval_every")
        saved = None
        while not finishing and state.step < num_steps:
            indices = rank_micro_batches(state.micro_batches, cfg.grad_accum, runtime.rank, runtime.world_size)
            started = time.perf_counter()
            step_lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves it after)
            record = _optimizer_step(wrapped, [batches.get(i) for i in indices], compute_loss, count_units,
                                     optimizer, cfg, device, runtime, state.step + 1)
            scheduler.step()
            state.step += 1
            state.micro_batches += cfg.grad_accum * runtime.world_size
            elapsed = time.perf_counter() - started
            record.update(step=state.step, epoch=round(state.micro_batches / plan.micro_batches_per_epoch, 3),
                          lr=step_lr, step_s=round(elapsed, 4),
                          tokens_per_s=round(record["tokens"] / elapsed, 1))
            if log and (state.step % cfg.log_every == 0 or state.step == num_steps):
                log.write(record)
            progress.update(task, advance=1, info=f"loss {record['loss']:.4f} lr {record['lr']:.2e} "
                            f"{record['tokens_per_s']:.0f} tok/s")
            early = False
            if evaluate and cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < num_steps:
                early = _select(tracker, state, _log_eval(evaluate, wrapped, model, log, state.step, progress),
                                runtime)
            state.stopped_early = early
            saved = None
            if early or (cfg.save_every and state.step % cfg.save_every == 0 and state.step < num_steps):
                saved = save()
            if signum := stop.requested(runtime):  # SIGTERM/SIGINT: this step is done; checkpoint it and stop
                raise RunInterrupted(signum, state.step, saved or save())
            if early:
                if not quiet and runtime.is_main:
                    progress.console.print(f"[yellow]early stop[/] at step {state.step}: no {cfg.metric_for_best} "
                                           f"improvement in {cfg.early_stopping_patience} evaluations")
                break
        if finishing:  # resumed after the last checkpoint: evaluate only if that was never logged
            if evaluate and not state.stopped_early and not _has_eval(log, runtime, state.step):
                _select(tracker, state, _log_eval(evaluate, wrapped, model, log, state.step,
                                                  None if quiet else progress), runtime)
            final = resume_from
        elif state.stopped_early:  # the early stop saved its step already
            final = saved
        else:
            if evaluate:
                _select(tracker, state, _log_eval(evaluate, wrapped, model, log, state.step,
                                                  None if quiet else progress), runtime)
            final = save()
        if signum := stop.requested(runtime):  # during the final evaluation or save: stop before the final files
            raise RunInterrupted(signum, state.step, final)
    if state.best_step is not None and state.best_step != state.step:
        load_trainable_weights(checkpoint_dir(output_dir, state.best_step), model)
    history = runtime.broadcast(log.read() if log else None)
    return FitResult(state=state, history=history)


def selection_results(result: FitResult, cfg: TrainConfig) -> dict[str, Any]:
    """What a recipe records about best-checkpoint selection in ``tunelab.json`` (empty without it)."""
    if cfg.metric_for_best is None:
        return {}
    return {"metric_for_best": cfg.metric_for_best, "best_step": result.state.best_step,
            "best_value": result.state.best_value, "stopped_early": result.state.stopped_early}


def _select(tracker: BestTracker | None, state: TrainState, metrics: dict[str, Any], runtime: Runtime) -> bool:
    """Update the best-checkpoint record with rank 0's evaluation; True = stop early (same on every rank)."""
    if tracker is None:
        return False
    return tracker.update(state, runtime.broadcast(metrics))


def _refuse_finished(path: Path, state: TrainState, num_steps: int, output_dir: Path) -> None:
    """Refuse to resume a run whose final files are written; one that stopped before them is finished instead."""
    if not run_finished(output_dir, state.step):
        return
    if state.stopped_early:
        raise TunelabError(
            f"--resume: {path} stopped early at step {state.step} (train.early_stopping_patience; best step "
            f"{state.best_step}), so the run is finished and nothing was changed; use --overwrite to start again")
    if state.step >= num_steps:
        raise TunelabError(
            f"--resume: {path} is at step {state.step} and this config plans {num_steps} steps, so "
            "the run is finished and nothing was changed; raise train.max_steps or train.epochs to train "
            "further, or use --overwrite to start again"
        )


def _has_eval(log: MetricsLog | None, runtime: Runtime, step: int) -> bool:
    """Whether ``metrics.jsonl`` already holds an evaluation at ``step`` (rank 0's answer, on every rank)."""
    return bool(runtime.broadcast(any(r.get("step") == step and any(k.startswith("eval/") for k in r)
                                      for r in log.read()) if log else None))


def _resume(path: Path, model, optimizer, scheduler, cfg: TrainConfig, runtime: Runtime,
            config_yaml: str) -> TrainState:
    """Load a checkpoint; its data position is in micro-batches, so their size must not change.

    The config may change only in :data:`tunelab.training.resume.MAY_CHANGE` keys; a changed
    ``train.lr`` (or schedule) is used from the resumed step on: the schedule's base rates come from
    this run's config, not from the checkpoint's scheduler state.
    """
    check_resumed_config(path, config_yaml, say=print if runtime.is_main else lambda _: None)
    base_lrs = list(scheduler.base_lrs)  # this run's train.lr; load_checkpoint restores the checkpoint's
    state = load_checkpoint(path, model, optimizer, scheduler, runtime=runtime)
    scheduler.base_lrs = base_lrs
    for group, base_lr in zip(optimizer.param_groups, base_lrs):
        group["initial_lr"] = base_lr
    if state.micro_batch_size is not None and state.micro_batch_size != cfg.batch_size:
        raise TunelabError(f"checkpoint {path} was trained with train.batch_size={state.micro_batch_size}; "
                           f"resume with the same batch size (got {cfg.batch_size})")
    check_same_step_size(path, state, cfg.grad_accum, runtime.world_size)
    state.micro_batch_size, state.micro_batches_per_step = cfg.batch_size, cfg.grad_accum * runtime.world_size
    # The optimizer's restored rates follow the checkpointed run's schedule; when this run has another
    # length (a finished run resumed with a larger train.max_steps), they would hold for one step (e.g.
    # 0 at the end of a decay). Set them from this run's schedule at the resumed step.
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    return state


def check_same_data(path: Path, state: TrainState, data_sha256: str, micro_batches_per_epoch: int) -> None:
    """A resumed run must train on the data the checkpoint was trained on.

    The data position is a count of micro-batches: with a data file edited, or a file added to or
    removed from a folder source, the same count points at other examples, so a resume would
    silently skip some, repeat others and mix two datasets in one model.

    Raises:
        TunelabError: the fingerprints differ (checkpoints from before it was recorded are not checked).
    """
    if state.data_sha256 is None or state.data_sha256 == data_sha256:
        state.data_sha256, state.micro_batches_per_epoch = data_sha256, micro_batches_per_epoch
        return
    raise TunelabError(
        f"--resume: the training data is not the data checkpoint {path} was trained on (sha256 "
        f"{state.data_sha256[:12]}… then, {data_sha256[:12]}… now; {state.micro_batches_per_epoch} → "
        f"{micro_batches_per_epoch} micro-batches per epoch): a data file was edited, or files were added to or "
        "removed from a folder source (`tunelab data inspect` lists them). Restore the data to resume, or start "
        "again with --overwrite")


def check_same_step_size(path: Path, state: TrainState, grad_accum: int, world_size: int) -> None:
    """A resumed run must take as many micro-batches per optimizer step as the checkpointed one.

    The data position is counted in micro-batches and the LR schedule in steps: with another
    ``world_size × grad_accum`` the remaining steps, the schedule and what one epoch is would all
    change silently. The same product on another number of processes (2 ranks × 4 → 1 × 8) resumes
    exactly (ranks take disjoint round-robin shares of the same micro-batches).

    Raises:
        TunelabError: the products differ; names both and the ``train.grad_accum`` that would match.
    """
    saved = state.micro_batches_per_step
    per_step = grad_accum * world_size
    if saved is None or saved == per_step:  # None: a checkpoint from before the count was recorded
        return
    saved_world = saved_world_size(path)
    fix = (f"set train.grad_accum={saved // world_size} to resume exactly on {world_size} process(es)"
           if saved % world_size == 0 else f"resume on a number of processes that divides {saved}")
    raise TunelabError(
        f"--resume: checkpoint {path} took world_size × grad_accum = {saved_world} × {saved // saved_world} = "
        f"{saved} micro-batches per optimizer step; this run takes {world_size} × {grad_accum} = {per_step}. "
        f"Resuming would silently change the remaining steps, the LR schedule and what an epoch is, so nothing "
        f"was changed: {fix}, or start again with --overwrite")


def _optimizer_step(wrapped, micro, compute_loss, count_units, optimizer, cfg, device, runtime,
                    step: int) -> dict[str, Any]:
    """Forward/backward over one accumulated batch, clip, step. ``step`` (1-based) only names errors.

    Raises:
        TunelabError: the gradient norm is not finite (a NaN/inf loss or gradient): nothing is updated.
    """
    normalizer = int(runtime.sum([sum(count_units(b) for b in micro)])[0])
    if normalizer == 0:
        raise RuntimeError("an accumulated batch has no supervised units; the data pipeline should have dropped it")
    total_loss, tokens, sums = 0.0, 0, {}
    for i, batch in enumerate(micro):
        tokens += int(batch.get("num_tokens", 0))
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with runtime.gradient_sync(i == len(micro) - 1):
            with autocast(cfg.precision, device):
                loss, metrics = wrapped(compute_loss, tensors, normalizer)
            loss.backward()
        total_loss += float(loss.detach())
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
    grad_norm = checked_step(
        optimizer, cfg.max_grad_norm, where=f"step {step}", detail=f" (summed loss {total_loss:.6g})",
        advice="no checkpoint was written for this step and earlier ones are untouched. Lower train.lr, set "
               "train.max_grad_norm, or use train.precision=fp32, then --resume from the last checkpoint")
    totals = runtime.sum_dicts({"loss": total_loss, "tokens": tokens, **sums})
    record = {"loss": round(totals.pop("loss"), 6), "grad_norm": round(grad_norm, 4),
              "tokens": int(totals.pop("tokens")), "units": normalizer}
    record.update({k: v for k, v in totals.items() if k not in ("nll_sum", "num_tokens", "num_correct")})
    return record



def _log_eval(evaluate, wrapped, model, log: MetricsLog | None, step: int, progress) -> dict[str, Any]:
    model.eval()
    with torch.no_grad():
        metrics = wrapped(lambda _model: evaluate())
    model.train()
    if log is None:
        return metrics
    log.write({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
    if progress is not None:
        progress.console.print(f"[bold]eval[/] step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics


class _BatchStream:
    """Micro-batch ``i`` of the run, building each epoch's plan once when first needed."""

    def __init__(self, plan: BatchPlan):
        self.plan, self.epoch, self.batches = plan, -1, []

    def fingerprint(self) -> str:
        """SHA-256 of epoch 0's micro-batches (every tensor's bytes and every scalar, in order): the
        examples the run trains on and their order. Epoch 0 stays built for the first steps."""
        if self.epoch != 0:
            self.epoch, self.batches = 0, self.plan.make_epoch(0)
        digest = hashlib.sha256()
        for batch in self.batches:
            for key in sorted(batch):
                value = batch[key]
                digest.update(key.encode() + b"\0")
                if isinstance(value, torch.Tensor):
                    digest.update(str(value.dtype).encode() + str(tuple(value.shape)).encode())
                    digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                else:
                    digest.update(repr(value).encode())
        return digest.hexdigest()

    def get(self, index: int) -> Batch:
        epoch, offset = divmod(index, self.plan.micro_batches_per_epoch)
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, self.plan.make_epoch(epoch)
        return self.batches[offset]
