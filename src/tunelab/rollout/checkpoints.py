"""Checkpoints, ``--resume`` and SIGTERM/SIGINT stops for the PPO and GRPO step loops.

An RL checkpoint is a one-process checkpoint (:mod:`tunelab.training.checkpoint`, with its manifest)
of the trainable parameters (policy adapters or weights, and PPO's value head), the optimizer and
scheduler, the RNG states, and the loop's own state in ``extra.pt``: the mini-batch shuffling
generator, the adaptive KL coefficient and the running score statistics. Resuming restores all of
it, so a resumed run samples the same rollouts and takes the same updates as the uninterrupted one.
Checkpoints are written every ``train.save_every`` RL steps, at a stop signal and after the last step
(before the final files, so a run killed while writing them is finished by ``--resume``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from tunelab.config.schema import TrainConfig
from tunelab.errors import TunelabError
from tunelab.training.checkpoint import (
    TrainState, clear_checkpoints, load_checkpoint, load_extra, run_finished, save_checkpoint,
)
from tunelab.training.distributed import single_process
from tunelab.training.interrupt import RunInterrupted, StopSignals
from tunelab.training.metrics import MetricsLog
from tunelab.training.outputs import writing_checkpoint
from tunelab.training.resume import check_resumed_config


class RLCheckpoints:
    """The checkpointing side of one RL run.

    Args:
        trainable: a module whose trainable parameters are the run's (e.g. ``nn.ModuleDict`` of policy
            and value head).
        get_extra / set_extra: the loop's own state as a picklable dict, and its restore.
    """

    def __init__(self, output_dir: Path, trainable: nn.Module, optimizer, scheduler, cfg: TrainConfig,
                 config_yaml: str, get_extra: Callable[[], dict[str, Any]], set_extra: Callable[[dict], None]):
        self.output_dir, self.trainable, self.optimizer, self.scheduler = output_dir, trainable, optimizer, scheduler
        self.cfg, self.config_yaml, self.get_extra, self.set_extra = cfg, config_yaml, get_extra, set_extra
        self.stop = StopSignals()
        self.start_step = 0

    def start(self, resume_from: Path | None, steps: int) -> tuple[int, MetricsLog]:
        """Restore ``resume_from`` (or start afresh); returns the first step to run (0-based) and the metrics log.

        Raises:
            TunelabError: the config differs in keys that cannot change, or the run is already finished.
        """
        metrics, samples = self.output_dir / "metrics.jsonl", self.output_dir / "samples.jsonl"
        if resume_from is None:
            clear_checkpoints(self.output_dir)
            samples.parent.mkdir(parents=True, exist_ok=True)
            samples.write_text("")
            return 0, MetricsLog(metrics, report_to=self.cfg.report_to, config_yaml=self.config_yaml)
        check_resumed_config(resume_from, self.config_yaml, say=print)
        base_lrs = list(self.scheduler.base_lrs)  # this run's rates, not the checkpoint's
        state = load_checkpoint(resume_from, self.trainable, self.optimizer, self.scheduler)
        self.scheduler.base_lrs = base_lrs
        for group, base_lr, factor in zip(self.optimizer.param_groups, base_lrs, self.scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = base_lr, base_lr * factor(self.scheduler.last_epoch)
        self.set_extra(load_extra(resume_from))
        if state.step >= steps and run_finished(self.output_dir, state.step):
            raise TunelabError(f"--resume: {resume_from} is at step {state.step} and this config plans {steps} "
                               "steps, so the run is finished and nothing was changed; raise train.max_steps to "
                               "train further, or use --overwrite to start again")
        self.start_step = state.step
        MetricsLog(samples, resume_step=state.step)  # drops sample lines past the checkpoint
        return state.step, MetricsLog(metrics, resume_step=state.step, report_to=self.cfg.report_to,
                                      config_yaml=self.config_yaml)

    def save(self, step: int) -> Path:
        """Write the checkpoint of ``step`` RL steps done."""
        with writing_checkpoint(self.output_dir, step):
            return save_checkpoint(self.output_dir, self.trainable, self.optimizer, self.scheduler,
                                   TrainState(step=step), self.config_yaml, self.cfg.keep_last,
                                   extra=self.get_extra())

    def after_step(self, step: int, steps: int) -> None:
        """Call after RL step ``step`` (1-based): checkpoint every ``train.save_every``; on a stop
        signal, checkpoint and raise :class:`RunInterrupted`."""
        saved = None
        if self.cfg.save_every and step % self.cfg.save_every == 0 and step < steps:
            saved = self.save(step)
        if signum := self.stop.requested(single_process()):
            raise RunInterrupted(signum, step, saved or self.save(step))

    def finish(self, steps: int) -> None:
        """Write the checkpoint after the last step, before the final files (unless this run resumed from
        it: then the final files are what is missing); on a stop signal since, raise :class:`RunInterrupted`."""
        final = self.save(steps) if self.start_step < steps else None
        if signum := self.stop.requested(single_process()):
            raise RunInterrupted(signum, steps, final or self.output_dir / "checkpoints")
