"""The opening both RL recipes (GRPO, PPO) share: refuse torchrun and resume, guard the output dir, seed, load
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
from tunelab.training.distributed import env_world_size
from tunelab.training.precision import pick_device


def start_rl_run(config: Config, *, resume: bool | str | None, overwrite: bool,
                 console: Console) -> tuple[RLSession, dict[str, Any] | None, float, Path | None]:
    """Returns the session, the held-out reward of the starting policy (or None), the start time (s) and
    the checkpoint to resume from (None for a fresh run; see :mod:`tunelab.rollout.checkpoints`).

    The starting policy's held-out reward is measured again on ``--resume`` (before any weight is
    restored, from the same seed, so it is the same measurement).

    Raises:
        TunelabError: launched by torchrun with several processes (``WORLD_SIZE`` > 1: RL recipes run on
            one process; each copy would train on its own and write the same ``output_dir``), ``resume``
            was asked for and there is no intact checkpoint, or ``output_dir`` holds a run.
    """
    refuse_several_processes(config.task)
    started = time.perf_counter()
    resume_from = check_output_dir(Path(config.output_dir), resume, overwrite)
    seed_everything(config.train.seed, config.train.threads)
    session = open_session(config, pick_device(), console)
    before = held_out_rewards(session, config) if config.eval.before_training and session.held_out else None
    if before:
        console.print(f"[bold]before[/] held-out reward {before['reward']:.4f} on {before['num_prompts']} prompts")
    return session, before, started, resume_from


def refuse_several_processes(task: str) -> None:
    """Raise :class:`TunelabError` when ``WORLD_SIZE`` > 1: ``task`` (ppo, grpo) has no distributed rollout
    or update yet, so N torchrun copies would train N independent policies into one ``output_dir``."""
    world_size = env_world_size()
    if world_size > 1:
        raise TunelabError(
            f"task={task} runs on one process only, but torchrun started {world_size} (WORLD_SIZE={world_size}): "
            "each copy would train its own policy and write the same output_dir. Launch it without torchrun "
            f"(tunelab train CONFIG), or use a task that supports several processes (sft)"
        )
