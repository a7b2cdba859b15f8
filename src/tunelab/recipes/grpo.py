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
from tunelab.losses.advantages import grpo_advantages, masked_mean
from tunelab.losses.ppo import grpo_loss
from tunelab.models.run import save_run
from tunelab.recipes.prepare import count_parameters, setup_trainable
from tunelab.recipes.rl_start import start_rl_run
from tunelab.rollout.checkpoints import RLCheckpoints
from tunelab.rollout.batch import RolloutBatch, accumulate, optimizer_step, rollout
from tunelab.rollout.evaluate import (
    held_out_rewards, log_samples, plot_reward_curve, report_rl, rl_results, sample_records,
)
from tunelab.rollout.rewards import compute_rewards
from tunelab.rollout.scoring import reference_logps, score_completions
from tunelab.rollout.session import RLSession, frozen_copy, mini_batches, num_rl_steps, prompts_for_step
from tunelab.training.optim import build_optimizer, build_scheduler
from tunelab.training.outputs import holds_run_lock


@holds_run_lock  # checks and locks output_dir for the whole run (training/outputs/)
def train(config: Config, *, resume: bool | str | None = None, overwrite: bool = False,
          console: Console | None = None) -> dict[str, Any]:
    """Run GRPO as configured; returns the before/after held-out rewards also stored in ``tunelab.json``."""
    console = console or Console()
    session, before, started, resume_from = start_rl_run(config, resume=resume, overwrite=overwrite, console=console)
    output_dir, tc, rl = Path(config.output_dir), config.train, config.rl
    device = session.device
    model = session.model

    setup_trainable(model, config)
    reference = frozen_copy(model) if tc.method != "lora" and rl.beta > 0 else None
    trainable, total = count_parameters(model)
    console.print(f"[bold]model[/] {config.model.name_or_path}: {trainable:,} trainable of {total:,} ({tc.method})")
    steps = num_rl_steps(config, len(session.train.prompts))
    rows = tc.batch_size * rl.num_generations
    updates_per_step = rl.ppo_epochs * -(-rows // (rl.mini_batch_size or rows))
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc, steps * updates_per_step)
    generator = torch.Generator().manual_seed(tc.seed)
    checkpoints = RLCheckpoints(output_dir, model, optimizer, scheduler, tc, dump_config(config),
                                lambda: {"generator": generator.get_state()},
                                lambda extra: generator.set_state(extra["generator"]))
    first, log = checkpoints.start(resume_from, steps)
    with checkpoints.stop, closing(log):  # SIGTERM/SIGINT: finish the step, checkpoint it, stop; trackers finish
        for step in range(first, steps):
            t0 = time.perf_counter()
            prompts = prompts_for_step(session.train.prompts, step, tc.batch_size, tc.seed, config.data.shuffle)
            step_lr = optimizer.param_groups[0]["lr"]  # the rate of this step's first update (logged)
            record, samples = grpo_step(session, prompts, config, optimizer, scheduler, reference, generator)
            record.update(step=step + 1, lr=step_lr, step_s=round(time.perf_counter() - t0, 2))
            if (step + 1) % tc.log_every == 0 or step + 1 == steps:
                log.write(record)
            if (step + 1) % rl.log_samples_every == 0 or step == 0:
                log_samples(output_dir / "samples.jsonl", step + 1, samples[:rl.num_logged_samples])
            console.print(f"step {step + 1}/{steps}  reward {record['reward/mean']:+.3f}  "
                          f"len {record['length/mean']:.1f}  loss {record['loss']:+.4f}  {record['step_s']:.1f}s")
            checkpoints.after_step(step + 1, steps)
        checkpoints.finish(steps)
    after = held_out_rewards(session, config) if session.held_out else None
    results = {**rl_results(session, before, after, steps, started), "scale_rewards": rl.scale_rewards,
               "kl_estimator": rl.resolved_kl_estimator("grpo")}
    save_run(output_dir, model, session.tokenizer, method=tc.method, base_model=config.model.name_or_path,
             config_yaml=dump_config(config), results=results, lineage=session.lineage)
    plot_reward_curve(log.read(), output_dir / "reward_curve.png", f"GRPO {config.model.name_or_path}",
                      (before["reward"], after["reward"]) if before and after else None, steps)
    report_rl(console, results, output_dir)
    return results


def grpo_step(session: RLSession, prompts: list, config: Config, optimizer, scheduler, reference,
              generator: torch.Generator) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One rollout → reward → advantage → update cycle; returns the metrics record and sample completions."""
    rl, tc, model = config.rl, config.train, session.model
    batch, inputs = rollout(model, session.tokenizer, prompts, rl, num_generations=rl.num_generations,
                            stop_ids=session.stop_ids, device=session.device)
    rewards, per_term = compute_rewards(session.terms, inputs)
    advantages = grpo_advantages(rewards, batch.prompt_index.cpu(), scale_rewards=rl.scale_rewards)
    batch.extra["advantages"] = advantages.to(session.device)
    args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    off_policy = rl.ppo_epochs > 1 or (rl.mini_batch_size or len(batch)) < len(batch)
    with torch.no_grad():
        if off_policy:  # otherwise old log-probs equal the current ones (ratio 1), no extra pass needed
            batch.extra["old_logps"] = score_completions(model, *args, temperature=rl.temperature).logps
        if rl.beta > 0:
            batch.extra["ref_logps"] = reference_logps(model, *args, temperature=rl.temperature, reference=reference)

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
    for _ in range(rl.ppo_epochs):
        for rows in mini_batches(len(batch), rl.mini_batch_size, generator):
            mini = batch.select(rows.to(session.device))
            metrics = accumulate(mini, rl.micro_batch_size, rl.loss_normalization, loss_fn)
            grad_norms.append(optimizer_step(optimizer, scheduler, tc.max_grad_norm))
            for key, value in metrics.items():
                sums.setdefault(key, []).append(value)
    record = _rollout_record(rewards, per_term, inputs.num_tokens, batch)
    record.update({k: round(sum(v) / len(v), 6) for k, v in sums.items()}, grad_norm=round(max(grad_norms), 4))
    return record, sample_records(inputs, rewards, per_term, limit=rl.num_logged_samples)


def _rollout_record(rewards, per_term, num_tokens, batch: RolloutBatch) -> dict[str, Any]:
    ids = batch.prompt_index.cpu()
    flat = torch.stack([rewards[ids == i].std() == 0 for i in ids.unique()])
    return {"reward/mean": round(float(rewards.mean()), 4), "reward/std": round(float(rewards.std()), 4),
            **{f"reward/{k}": round(float(v.mean()), 4) for k, v in per_term.items()},
            "length/mean": round(sum(num_tokens) / len(num_tokens), 2),
            "truncated": round(float(batch.truncated.float().mean()), 4),
            "groups_without_signal": round(float(flat.float().mean()), 4)}


