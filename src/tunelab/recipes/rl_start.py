"""The opening both RL recipes (GRPO, PPO) share: join the torchrun run (if any), guard the output dir, seed,
load the session (policy, tokenizer, prompts, rewards) and score the starting policy on held-out prompts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

from tunelab.config.schema import Config
from tunelab.recipes.prepare import check_output_dir, seed_everything
from tunelab.rollout.evaluate import held_out_rewards
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
