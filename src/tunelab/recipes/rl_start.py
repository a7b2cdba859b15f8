"""The opening and the ending both RL recipes (GRPO, PPO) share. Opening: join the torchrun run (if any), guard
the output dir, seed, load the session (policy, tokenizer, prompts, rewards) and score the starting policy on
held-out prompts. Ending: score the trained policy, save the run on rank 0, plot and report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from torch import nn

from tunelab.config.load import dump_config
from tunelab.config.schema import Config
from tunelab.models.run import save_run, whole_state_dict
from tunelab.recipes.prepare import check_output_dir, seed_everything
from tunelab.rollout.evaluate import held_out_rewards, plot_reward_curve, report_rl, rl_results
from tunelab.rollout.session import RLSession, open_session
from tunelab.training.distributed import init_distributed


def start_rl_run(config: Config, *, resume: bool | str | None, overwrite: bool,
                 console: Console) -> tuple[RLSession, dict[str, Any] | None, float, Path | None]:
    """Returns the session (its ``runtime`` says which rank this is, see :mod:`tunelab.rollout.shards`), the
    held-out reward of the starting policy (or None), the start time (s) and the checkpoint to resume from
    (None for a fresh run; see :mod:`tunelab.rollout.checkpoints`).

    Under torchrun every rank calls this; rank 0 alone checks ``output_dir`` and prints (``session.console``
    is quiet on the others). The starting policy's held-out reward is measured again on ``--resume``
    (before any weight is restored, from the same seed, so it is the same measurement).

    Raises:
        TunelabError: ``resume`` was asked for and there is no intact checkpoint, or ``output_dir`` holds a
            run; ConfigError: ``distributed`` settings that do not fit the launch
            (:func:`tunelab.training.distributed.init_distributed`).
    """
    runtime = init_distributed(config.distributed, config.train.precision)
    console = console if runtime.is_main else Console(quiet=True)
    started = time.perf_counter()
    resume_from = runtime.broadcast(check_output_dir(Path(config.output_dir), resume, overwrite)
                                    if runtime.is_main else None)
    seed_everything(config.train.seed, config.train.threads)
    session = open_session(config, runtime.device, console)
    session.runtime, session.console = runtime, console
    before = held_out_rewards(session, config) if config.eval.before_training and session.held_out else None
    if before:
        console.print(f"[bold]before[/] held-out reward {before['reward']:.4f} on {before['num_prompts']} prompts")
    return session, before, started, resume_from


def finish_rl_run(session: RLSession, config: Config, model: nn.Module, before: dict[str, Any] | None, steps: int,
                  started: float, records: Callable[[], list[dict[str, Any]]], title: str, extra: dict[str, Any],
                  save_extra: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Score the trained policy on the held-out prompts, save the run on rank 0 (``save_extra(output_dir)``
    first, e.g. PPO's value head: ``tunelab.json``, written last by :func:`save_run`, marks the run finished),
    plot the reward curve and report; returns the results (``extra`` merged in).

    Collective under torchrun: every rank calls it (FSDP full fine-tunes gather their weights first, and
    generation needs the whole policy on every rank).
    """
    runtime, output_dir, tc = session.runtime, Path(config.output_dir), config.train
    weights = whole_state_dict(model) if tc.method != "lora" else None  # FSDP full: gathered (collective)
    with runtime.full_weights():  # FSDP: the whole policy (and value head) on every rank to generate and save
        after = held_out_rewards(session, config) if session.held_out else None
        results = {**rl_results(session, before, after, steps, started), **extra, "world_size": runtime.world_size}
        if runtime.is_main:
            if save_extra is not None:
                save_extra(output_dir)
            save_run(output_dir, model, session.tokenizer, method=tc.method, base_model=config.model.name_or_path,
                     config_yaml=dump_config(config), results=results, state_dict=weights, lineage=session.lineage)
    if runtime.is_main:
        plot_reward_curve(records(), output_dir / "reward_curve.png", f"{title} {config.model.name_or_path}",
                          (before["reward"], after["reward"]) if before and after else None, steps)
    report_rl(session.console, results, output_dir)
    runtime.close()
    return results
