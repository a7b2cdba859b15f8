"""PPO-RLHF: policy + value head against a reward model, with a KL penalty to the reference.

Each RL step (Ouyang et al. 2022, arXiv:2203.02155, Sec. 3.5; Ziegler et al. 2019, arXiv:1909.08593):
sample completions for ``train.batch_size`` prompts, score each with the reward terms (typically a
``reward_model`` run), spread the score onto the last completion token and subtract
``kl_coef * KL`` at every token (``rl.kl_estimator``: k1, k2, k3 or abs against the reference = the
policy with LoRA switched off; the same estimator is logged as ``kl``), estimate advantages with GAE (Schulman et al. 2016, arXiv:1506.02438) from
the value head, whiten them over real tokens (``advantages/applied`` is 0 when fewer than two
real tokens left them unscaled), and run ``rl.ppo_epochs`` passes of the clipped policy loss
(Schulman et al. 2017, arXiv:1707.06347, Eq. 7) plus ``vf_coef`` × the clipped value loss over
mini-batches. The KL coefficient is fixed or adaptive (Ziegler et al. 2019, Sec. 2.2).

Reward scores are normalized to mean 0 / std 1 with running statistics (``rl.normalize_scores``,
:class:`~tunelab.losses.advantages.RunningMoments`) before the KL penalty is subtracted; the value
head (a fresh linear layer) can have its own learning rate (``rl.value_lr``).

Deliberate simplifications: no pretraining-gradient mix (PPO-ptx); the value head shares the
policy's trunk (no separate critic model); no score clipping. Checkpoints and ``--resume``:
:mod:`tunelab.rollout.checkpoints`.

Under torchrun (DDP or FSDP2; policy and value head wrapped together) each rank samples and scores its
``train.batch_size`` prompts; the score normalization and the advantage whitening use statistics summed
over all ranks, so N ranks train like one process with N × the batch (:mod:`tunelab.rollout.shards`).
"""

from __future__ import annotations

import time
from contextlib import closing
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from tunelab.config.load import dump_config
from tunelab.config.schema import Config
from tunelab.losses.advantages import RunningMoments, gae, masked_sums, ppo_token_rewards, whiten_with_sums
from tunelab.losses.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController
from tunelab.losses.ppo import ppo_policy_loss, ppo_value_loss
from tunelab.models.value_head import ValueHead
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
    """Run PPO as configured; returns the before/after held-out rewards also stored in ``tunelab.json``."""
    session, before, started, resume_from = start_rl_run(config, resume=resume, overwrite=overwrite,
                                                         console=console or Console())
    output_dir, tc, rl, runtime, console = Path(config.output_dir), config.train, config.rl, session.runtime, session.console
    model = session.model

    setup_trainable(model, config)
    reference = frozen_copy(model) if tc.method != "lora" else None
    value_head = ValueHead(model.config.hidden_size).to(session.device)
    trainable_modules = nn.ModuleDict({"policy": model, "value_head": value_head})
    runtime.wrap(trainable_modules)  # DDP / FSDP2 of policy + value head, before the optimizer
    trainable, total = count_parameters(model)
    console.print(f"[bold]model[/] {config.model.name_or_path}: {trainable:,} trainable of {total:,} ({tc.method}) "
                  f"+ value head {sum(p.numel() for p in value_head.parameters()):,}")
    steps = num_rl_steps(config, len(session.train.prompts), runtime.world_size)
    rows = tc.batch_size * rl.num_generations
    optimizer = build_optimizer(model, tc)
    optimizer.add_param_group(value_param_group(value_head, config))
    scheduler = build_scheduler(optimizer, tc, steps * rl.ppo_epochs * -(-rows // (rl.mini_batch_size or rows)))
    kl_ctl = (AdaptiveKLController(rl.kl_coef, rl.kl_target, rl.kl_horizon) if rl.adaptive_kl
              else FixedKLController(rl.kl_coef))
    generator = torch.Generator().manual_seed(tc.seed)  # mini-batch order: the same on every rank
    moments = RunningMoments() if rl.normalize_scores else None
    checkpoints = RLCheckpoints(output_dir, trainable_modules, optimizer, scheduler, tc, dump_config(config),
                                lambda: _loop_state(generator, kl_ctl, moments),
                                lambda extra: _restore_loop_state(extra, generator, kl_ctl, moments), runtime=runtime,
                                data_sha256=prompts_fingerprint(session.train.prompts))
    first, log = checkpoints.start(resume_from, steps)
    with checkpoints.stop, closing(log):  # SIGTERM/SIGINT: finish the step, checkpoint it, stop (all ranks
        # after the same step); trackers finish
        for step in range(first, steps):
            t0 = time.perf_counter()
            prompts = step_prompts(session, step, tc.batch_size, tc.seed, config.data.shuffle)
            step_lr = optimizer.param_groups[0]["lr"]  # the rate of this step's first update (logged)
            record, samples = ppo_step(session, value_head, prompts, config, optimizer, scheduler, reference, kl_ctl,
                                       generator, moments, step=step)
            record.update(step=step + 1, lr=step_lr, step_s=round(time.perf_counter() - t0, 2))
            if (step + 1) % tc.log_every == 0 or step + 1 == steps:
                log.write(record)
            if runtime.is_main and ((step + 1) % rl.log_samples_every == 0 or step == 0):
                log_samples(output_dir / "samples.jsonl", step + 1, samples)
            console.print(f"step {step + 1}/{steps}  score {record['reward/mean']:+.3f}  kl {record['kl']:.3f}  "
                          f"beta {record['kl_coef']:.4f}  len {record['length/mean']:.1f}  {record['step_s']:.1f}s")
            checkpoints.after_step(step + 1, steps)
        checkpoints.finish(steps)
    return finish_rl_run(session, config, model, before, steps, started, log.read, "PPO",
                         {"kl_estimator": rl.resolved_kl_estimator("ppo")}, save_extra=value_head.save)


def _loop_state(generator: torch.Generator, kl_ctl, moments: RunningMoments | None) -> dict[str, Any]:
    """What a checkpoint keeps of the PPO loop besides weights, optimizer and RNG."""
    return {"generator": generator.get_state(), "kl_coef": kl_ctl.value,
            "moments": None if moments is None else (moments.count, moments.mean, moments.m2)}


def _restore_loop_state(extra: dict[str, Any], generator: torch.Generator, kl_ctl,
                        moments: RunningMoments | None) -> None:
    generator.set_state(extra["generator"])
    kl_ctl.value = extra["kl_coef"]
    if moments is not None and extra["moments"] is not None:
        moments.count, moments.mean, moments.m2 = extra["moments"]


def value_param_group(value_head: ValueHead, config: Config) -> dict[str, Any]:
    """The optimizer parameter group of the value head: ``rl.value_lr`` (default 10 × ``train.lr``), no decay."""
    return {"params": list(value_head.parameters()), "lr": config.rl.value_lr or 10 * config.train.lr,
            "weight_decay": 0.0}


@torch.no_grad()
def make_advantages(session: RLSession, value_head: ValueHead, batch: RolloutBatch, scores: torch.Tensor,
                    config: Config, reference: nn.Module | None,
                    kl_coef: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Whitening metrics, and old log-probs/values, per-token KL, KL-shaped rewards, GAE advantages (whitened
    over real tokens) and returns, all (B, C). The ``kl`` returned (masked) is exactly the estimator
    (``rl.kl_estimator``) whose ``kl_coef`` multiple was subtracted from the rewards, so what is logged is what
    shaped the reward. Under torchrun the whitening statistics are those of every rank's real tokens
    (all-reduced count, sum, sum of squares; a rank with none still joins), so they equal one process's."""
    rl, mask = config.rl, batch.loss_mask
    args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    old = score_completions(session.model, *args, temperature=rl.temperature, value_head=value_head)
    ref = reference_logps(session.model, *args, temperature=rl.temperature, reference=reference)
    kl = KL_ESTIMATORS[rl.resolved_kl_estimator("ppo")](old.logps, ref)
    rewards = ppo_token_rewards(scores.to(mask.device), kl, mask, kl_coef)
    advantages, returns = gae(rewards, old.values, mask, rl.gamma, rl.lam)
    whiten_metrics: dict[str, torch.Tensor] = {}
    if rl.whiten_advantages:  # fewer than two real tokens: left unscaled, and whiten/applied says so
        sums = global_sums(session.runtime, masked_sums(advantages, mask))
        advantages, whiten_metrics = whiten_with_sums(advantages, mask, sums)
    return whiten_metrics, {
        "old_logps": old.logps, "old_values": old.values, "advantages": advantages, "returns": returns,
        "kl": torch.where(mask, kl, torch.zeros_like(kl)), "entropy": old.entropy}


def ppo_step(session: RLSession, value_head: ValueHead, prompts: list, config: Config, optimizer, scheduler,
             reference: nn.Module | None, kl_ctl, generator: torch.Generator,
             moments: RunningMoments | None = None, *, step: int = 0) -> tuple[dict[str, Any], list[dict]]:
    """One rollout → reward → GAE → PPO-update cycle of this rank's ``prompts`` (RL step ``step``, 0-based,
    seeds the sampling); returns the metrics record (of the whole step, the same on every rank) and this
    rank's sample completions.

    ``moments`` (updated in place with this step's scores of every rank first) normalizes the scores the
    advantages are built from; the record keeps the raw scores (``reward/mean``) and adds the
    normalized mean (``reward/normalized_mean``)."""
    rl, model, runtime = config.rl, session.model, session.runtime
    seeds = rank_row_seeds(runtime, config.train.seed, step, len(prompts) * rl.num_generations)
    kl_coef = kl_ctl.value

    def collect():
        batch, inputs = rollout(model, session.tokenizer, prompts, rl, num_generations=rl.num_generations,
                                stop_ids=session.stop_ids, device=session.device, row_seeds=seeds)
        scores, per_term = compute_rewards(session.terms, inputs)
        normalized = scores
        if moments is not None:
            moments.update_sums(global_sums(runtime, masked_sums(scores, torch.ones_like(scores, dtype=torch.bool))))
            normalized = moments.normalize(scores)
        whiten_metrics, extra = make_advantages(session, value_head, batch, normalized, config, reference, kl_coef)
        batch.extra.update(extra)
        return batch, inputs, scores, per_term, normalized, whiten_metrics

    batch, inputs, scores, per_term, normalized, whiten_metrics = with_whole_model(runtime, collect)

    def loss_fn(micro: RolloutBatch):
        scored = score_completions(model, micro.prompt_ids, micro.prompt_mask, micro.completion_ids,
                                   micro.completion_mask, temperature=rl.temperature, value_head=value_head)
        policy_loss, metrics = ppo_policy_loss(scored.logps, micro.extra["old_logps"], micro.extra["advantages"],
                                               micro.loss_mask, rl.clip_eps)
        value_loss, value_metrics = ppo_value_loss(scored.values, micro.extra["old_values"], micro.extra["returns"],
                                                   micro.loss_mask, rl.value_clip_eps)
        metrics.update(value_metrics, **{"policy/loss": policy_loss.detach(), "value/loss": value_loss.detach()})
        return policy_loss + rl.vf_coef * value_loss, metrics

    sums, grad_norms = {}, []
    filler = batch.select(torch.zeros(1, dtype=torch.long, device=session.device))
    for _ in range(rl.ppo_epochs):
        for share in mini_batch_shares(len(batch), rl.mini_batch_size, rl.micro_batch_size, generator,
                                       runtime.rank, runtime.world_size):
            metrics = accumulate(batch.select(share.rows.to(session.device)), rl.micro_batch_size, "token", loss_fn,
                                 runtime=runtime, num_micro_batches=share.num_micro_batches, filler=filler)
            grad_norms.append(optimizer_step(optimizer, scheduler, config.train.max_grad_norm))
            for key, value in metrics.items():
                sums.setdefault(key, []).append(value)
    seq_kl = gather_rows(runtime, batch.extra["kl"].sum(dim=1))
    kl_ctl.update(float(seq_kl.mean()), n_steps=len(seq_kl))
    record = {**_score_record(runtime, scores, per_term, normalized), "kl": round(float(seq_kl.mean()), 4),
              "kl_coef": round(kl_coef, 5),
              **{f"advantages/{k.removeprefix('whiten/')}": round(float(v), 6) for k, v in whiten_metrics.items()},
              **_rollout_shape(runtime, batch, inputs.num_tokens), "grad_norm": round(max(grad_norms), 4),
              **{k: round(sum(v) / len(v), 6) for k, v in sums.items()}}
    return record, sample_records(inputs, scores, per_term, limit=rl.num_logged_samples)


def _score_record(runtime, scores, per_term, normalized) -> dict[str, float]:
    """Raw and normalized score statistics over every rank's rows."""
    scores, normalized = gather_rows(runtime, scores), gather_rows(runtime, normalized)
    return {"reward/mean": round(float(scores.mean()), 4), "reward/std": round(float(scores.std()), 4),
            **{f"reward/{k}": round(float(gather_rows(runtime, v).mean()), 4) for k, v in per_term.items()},
            "reward/normalized_mean": round(float(normalized.mean()), 4)}


def _rollout_shape(runtime, batch: RolloutBatch, num_tokens: list[int]) -> dict[str, float]:
    """Entropy (mean over every rank's real tokens), mean length and truncated fraction of the step."""
    entropy = global_sums(runtime, masked_sums(batch.extra["entropy"], batch.loss_mask))
    lengths = gather_rows(runtime, torch.tensor(num_tokens, dtype=torch.float64))
    return {"entropy": round(float(entropy[1] / max(float(entropy[0]), 1.0)), 4),
            "length/mean": round(float(lengths.mean()), 2),
            "truncated": round(float(gather_rows(runtime, batch.truncated.double()).mean()), 4)}
