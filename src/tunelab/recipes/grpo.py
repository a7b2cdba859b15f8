"""GRPO: group-relative policy optimization with programmable rewards (Shao et al. 2024, arXiv:2402.03300).

Each RL step: take ``train.batch_size`` prompts, sample ``rl.num_generations`` (G) completions of
each from the current policy, score them with the reward terms, turn the rewards into
group-normalized advantages grouped by prompt id (Sec. 4.1.2; ``rl.scale_rewards``: ``group`` std,
``batch`` std of the whole rollout, ``none`` = Dr. GRPO), then run ``rl.ppo_epochs`` passes of the
clipped objective (Eq. 3) over mini-batches, with an optional KL to the reference (``rl.beta``;
``rl.kl_estimator``, k3 = Eq. 4 by default, the same estimator logged as ``policy/kl``); the loss
is averaged over real completion tokens only.

Deliberate simplifications: outcome supervision only (one reward per completion, no process
rewards); no iterative reward-model retraining (Sec. 4.1.4); the reference is the starting
policy and never refreshed. Checkpoints and ``--resume``: :mod:`tunelab.rollout.checkpoints`.

Under torchrun (DDP or FSDP2) each rank samples the groups of its ``train.batch_size`` prompts, scores them
and trains on its rows; N ranks train like one process with N × the batch (:mod:`tunelab.rollout.shards`).
"""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tunelab.config.load import dump_config
from tunelab.config.schema import Config
from tunelab.losses.advantages import grpo_advantages, masked_mean, masked_sums, std_from_sums
from tunelab.losses.ppo import grpo_loss
from tunelab.recipes.prepare import count_parameters, setup_trainable
from tunelab.recipes.rl_start import finish_rl_run, start_rl_run
from tunelab.rollout.checkpoints import RLCheckpoints, prompts_fingerprint
from tunelab.rollout.batch import RolloutBatch, accumulate, optimizer_step, rollout
from tunelab.rollout.evaluate import log_samples, sample_records
from tunelab.rollout.rewards import compute_rewards
from tunelab.rollout.scoring import reference_logps, score_completions
from tunelab.rollout.session import RLSession, frozen_copy, num_rl_steps
from tunelab.rollout.shards import (
    gather_rows, global_sums, mini_batch_shares, rank_row_seeds, step_prompts, with_whole_model,
)
from tunelab.training.optim import build_optimizer, build_scheduler
from tunelab.training.outputs import holds_run_lock


@holds_run_lock  # checks and locks output_dir for the whole run (training/outputs/)
def train(config: Config, *, resume: bool | str | None = None, overwrite: bool = False,
          console: Console | None = None) -> dict[str, Any]:
    """Run GRPO as configured; returns the before/after held-out rewards also stored in ``tunelab.json``."""
    session, before, started, resume_from = start_rl_run(config, resume=resume, overwrite=overwrite,
                                                         console=console or Console())
    output_dir, tc, rl, runtime, console = Path(config.output_dir), config.train, config.rl, session.runtime, session.console
    model = session.model

    setup_trainable(model, config)
    reference = frozen_copy(model) if tc.method != "lora" and rl.beta > 0 else None
    runtime.wrap(model)  # DDP / FSDP2 (after the trainable parameters are set, before the optimizer)
    trainable, total = count_parameters(model)
    console.print(f"[bold]model[/] {config.model.name_or_path}: {trainable:,} trainable of {total:,} ({tc.method})")
    steps = num_rl_steps(config, len(session.train.prompts), runtime.world_size)
    rows = tc.batch_size * rl.num_generations
    updates_per_step = rl.ppo_epochs * -(-rows // (rl.mini_batch_size or rows))
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc, steps * updates_per_step)
    generator = torch.Generator().manual_seed(tc.seed)  # mini-batch order: the same on every rank
    checkpoints = RLCheckpoints(output_dir, model, optimizer, scheduler, tc, dump_config(config),
                                lambda: {"generator": generator.get_state()},
                                lambda extra: generator.set_state(extra["generator"]), runtime=runtime,
                                data_sha256=prompts_fingerprint(session.train.prompts))
    first, log = checkpoints.start(resume_from, steps)
    with checkpoints.stop, closing(log):  # SIGTERM/SIGINT: finish the step, checkpoint it, stop (all ranks
        # after the same step); trackers finish
        for step in range(first, steps):
            t0 = time.perf_counter()
            prompts = step_prompts(session, step, tc.batch_size, tc.seed, config.data.shuffle)
            step_lr = optimizer.param_groups[0]["lr"]  # the rate of this step's first update (logged)
            record, samples = grpo_step(session, prompts, config, optimizer, scheduler, reference, generator,
                                        step=step)
            record.update(step=step + 1, lr=step_lr, step_s=round(time.perf_counter() - t0, 2))
            if (step + 1) % tc.log_every == 0 or step + 1 == steps:
                log.write(record)
            if runtime.is_main and ((step + 1) % rl.log_samples_every == 0 or step == 0):
                log_samples(output_dir / "samples.jsonl", step + 1, samples[:rl.num_logged_samples])
            console.print(f"step {step + 1}/{steps}  reward {record['reward/mean']:+.3f}  "
                          f"len {record['length/mean']:.1f}  loss {record['loss']:+.4f}  {record['step_s']:.1f}s")
            checkpoints.after_step(step + 1, steps)
        checkpoints.finish(steps)
    return finish_rl_run(session, config, model, before, steps, started, log.read, "GRPO",
                         {"scale_rewards": rl.scale_rewards, "kl_estimator": rl.resolved_kl_estimator("grpo")})


def grpo_step(session: RLSession, prompts: list, config: Config, optimizer, scheduler, reference,
              generator: torch.Generator, *, step: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One rollout → reward → advantage → update cycle of this rank's ``prompts`` (RL step ``step``, 0-based,
    seeds the sampling); returns the metrics record (of the whole step, the same on every rank) and sample
    completions (this rank's)."""
    rl, tc, model, runtime = config.rl, config.train, session.model, session.runtime
    seeds = rank_row_seeds(runtime, tc.seed, step, len(prompts) * rl.num_generations)
    batch, inputs, rewards, per_term = with_whole_model(
        runtime, lambda: _collect(session, prompts, config, reference, seeds))

    def loss_fn(micro: RolloutBatch):
        scored = score_completions(model, micro.prompt_ids, micro.prompt_mask, micro.completion_ids,
                                   micro.completion_mask, temperature=rl.temperature)
        old = micro.extra.get("old_logps", scored.logps.detach())
        loss, metrics = grpo_loss(scored.logps, old, micro.extra["advantages"], micro.loss_mask, rl.clip_eps,
                                  ref_logps=micro.extra.get("ref_logps"), beta=rl.beta,
                                  normalization=rl.loss_normalization,
                                  kl_estimator=rl.resolved_kl_estimator("grpo"))
        metrics["entropy"] = masked_mean(scored.entropy, micro.loss_mask)
        return loss, metrics

    sums, grad_norms = {}, []
    filler = batch.select(torch.zeros(1, dtype=torch.long, device=session.device))
    for _ in range(rl.ppo_epochs):
        for share in mini_batch_shares(len(batch), rl.mini_batch_size, rl.micro_batch_size, generator,
                                       runtime.rank, runtime.world_size):
            mini = batch.select(share.rows.to(session.device))
            metrics = accumulate(mini, rl.micro_batch_size, rl.loss_normalization, loss_fn, runtime=runtime,
                                 num_micro_batches=share.num_micro_batches, filler=filler)
            grad_norms.append(optimizer_step(optimizer, scheduler, tc.max_grad_norm))
            for key, value in metrics.items():
                sums.setdefault(key, []).append(value)
    record = _rollout_record(runtime, rewards, per_term, inputs.num_tokens, batch)
    record.update({k: round(sum(v) / len(v), 6) for k, v in sums.items()}, grad_norm=round(max(grad_norms), 4))
    return record, sample_records(inputs, rewards, per_term, limit=rl.num_logged_samples)


@torch.no_grad()
def _collect(session: RLSession, prompts: list, config: Config, reference, seeds: list[int]):
    """Sample, reward and score this rank's rows: the batch (with ``advantages`` and, as needed, old and
    reference log-probs in ``extra``), the reward inputs, the (R,) rewards and each term's (R,) scores."""
    rl, model = config.rl, session.model
    batch, inputs = rollout(model, session.tokenizer, prompts, rl, num_generations=rl.num_generations,
                            stop_ids=session.stop_ids, device=session.device, row_seeds=seeds)
    rewards, per_term = compute_rewards(session.terms, inputs)
    batch_std = None
    if rl.scale_rewards == "batch":  # the std of the whole step's rewards, over every rank
        everyone = torch.ones_like(rewards, dtype=torch.bool)
        batch_std = std_from_sums(global_sums(session.runtime, masked_sums(rewards, everyone)))
    advantages = grpo_advantages(rewards, batch.prompt_index.cpu(), scale_rewards=rl.scale_rewards,
                                 batch_std=batch_std)
    batch.extra["advantages"] = advantages.to(session.device)
    args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    off_policy = rl.ppo_epochs > 1 or (rl.mini_batch_size or len(batch)) < len(batch)
    if off_policy:  # otherwise old log-probs equal the current ones (ratio 1), no extra pass needed
        batch.extra["old_logps"] = score_completions(model, *args, temperature=rl.temperature).logps
    if rl.beta > 0:
        batch.extra["ref_logps"] = reference_logps(model, *args, temperature=rl.temperature, reference=reference)
    return batch, inputs, rewards, per_term


def _rollout_record(runtime, rewards, per_term, num_tokens, batch: RolloutBatch) -> dict[str, Any]:
    """The step's rollout statistics over every rank's rows (gathered: the same record on every rank)."""
    rewards = gather_rows(runtime, rewards)
    per_term = {k: gather_rows(runtime, v) for k, v in per_term.items()}
    lengths = gather_rows(runtime, torch.tensor(num_tokens, dtype=torch.float64))
    truncated = gather_rows(runtime, batch.truncated.double())
    num_prompts = int(batch.prompt_index.max()) + 1
    ids = gather_rows(runtime, (batch.prompt_index + runtime.rank * num_prompts).double()).long()
    flat = torch.stack([rewards[ids == i].std() == 0 for i in ids.unique()])
    return {"reward/mean": round(float(rewards.mean()), 4), "reward/std": round(float(rewards.std()), 4),
            **{f"reward/{k}": round(float(v.mean()), 4) for k, v in per_term.items()},
            "length/mean": round(float(lengths.mean()), 2),
            "truncated": round(float(truncated.mean()), 4),
            "groups_without_signal": round(float(flat.float().mean()), 4)}
