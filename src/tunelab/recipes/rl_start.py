"""The opening both RL recipes (GRPO, PPO) share: refuse resume, guard the output dir, seed, load
the session (policy, tokenizer, prompts, rewards) and score the starting policy on held-out prompts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from tunelab.config.schema import Config
from tunelab.errors import TunelabError
from tunelab.recipes.prepare import check_output_dir, seed_everything
from tunelab.rollout.evaluate import held_out_rewards
from tunelab.rollout.session import RLSession, open_session
from tunelab.training.precision import pick_device


def start_rl_run(config: Config, *, resume: bool | str | None, overwrite: bool,
                 console: Console) -> tuple[RLSession, dict[str, Any] | None, float]:
    """Returns the session, the held-out reward of the starting policy (or None) and the start time (s).

    Raises:
        TunelabError: ``resume`` was asked for (RL runs cannot resume), or ``output_dir`` holds a run.
    """
    if resume:
        raise TunelabError(f"task={config.task} cannot resume from a checkpoint; start again with --overwrite")
    started = time.perf_counter()
    check_output_dir(Path(config.output_dir), resume, overwrite)
    seed_everything(config.train.seed, config.train.threads)
    session = open_session(config, pick_device(), console)
    before = held_out_rewards(session, config) if config.eval.before_training and session.held_out else None
    if before:
        console.print(f"[bold]before[/] held-out reward {before['reward']:.4f} on {before['num_prompts']} prompts")
    return session, before, started
