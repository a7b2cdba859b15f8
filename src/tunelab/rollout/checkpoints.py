"""Checkpoints, ``--resume`` and SIGTERM/SIGINT stops for the PPO and GRPO step loops.

An RL checkpoint is a one-process checkpoint (:mod:`tunelab.training.checkpoint`, with its manifest)
of the trainable parameters (policy adapters or weights, and PPO's value head), the optimizer and
scheduler, the RNG states, and the loop's own state in ``extra.pt``: the mini-batch shuffling
generator, the adaptive KL coefficient and the running score statistics. Resuming restores all of
it, so a resumed run samples the same rollouts and takes the same updates as the uninterrupted one.
Checkpoints are written every ``train.save_every`` RL steps, at a stop signal and after the last step
(before the final files, so a run killed while writing them is finished by ``--resume``).

Under torchrun (a distributed ``runtime``) the checkpoint is the sharded ``torch.distributed.checkpoint``
layout every recipe writes (:mod:`tunelab.training.checkpoint`), ``extra.pt`` (the same on every rank)
written by rank 0; the stop flag is all-reduced at every step boundary so all ranks stop after the same
step and write one checkpoint together; only rank 0 writes ``metrics.jsonl`` and ``samples.jsonl``. A
checkpoint resumes on the world size that wrote it; another one is refused (the step's prompts and the
mini-batches are cut by ``world_size × batch_size``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from tunelab.config.schema import TrainConfig
from tunelab.errors import TunelabError
from tunelab.training.checkpoint import (
    TrainState, clear_previous_run, load_checkpoint, load_extra, run_finished, save_checkpoint, saved_world_size,
)
from tunelab.training.distributed import Runtime, single_process
from tunelab.training.interrupt import RunInterrupted, StopSignals
from tunelab.training.metrics import MetricsLog
from tunelab.training.outputs import writing_checkpoint
from tunelab.training.resume import check_resumed_config


def prompts_fingerprint(prompts: Sequence[Any]) -> str:
    """SHA-256 of the training prompts in order: token ids and source records (reward fields included)."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps([prompt.input_ids, prompt.example], sort_keys=True, default=str).encode() + b"\n")
    return digest.hexdigest()


class RLCheckpoints:
    """The checkpointing side of one RL run.

    Args:
        trainable: a module whose trainable parameters are the run's (e.g. ``nn.ModuleDict`` of policy
            and value head).
        get_extra / set_extra: the loop's own state as a picklable dict, and its restore.
        runtime: the run's :class:`~tunelab.training.distributed.Runtime` (None: one plain process).
    """

    def __init__(self, output_dir: Path, trainable: nn.Module, optimizer, scheduler, cfg: TrainConfig,
                 config_yaml: str, get_extra: Callable[[], dict[str, Any]], set_extra: Callable[[dict], None],
                 runtime: Runtime | None = None, data_sha256: str | None = None):
        self.output_dir, self.trainable, self.optimizer, self.scheduler = output_dir, trainable, optimizer, scheduler
        self.cfg, self.config_yaml, self.get_extra, self.set_extra = cfg, config_yaml, get_extra, set_extra
        self.runtime = runtime or single_process()
        self.data_sha256 = data_sha256  # the training prompts (prompts_fingerprint); checked on resume
        self.stop = StopSignals()
        self.start_step = 0

    def start(self, resume_from: Path | None, steps: int) -> tuple[int, MetricsLog]:
        """Restore ``resume_from`` (or start afresh); returns the first step to run (0-based) and the metrics log.

        On ranks other than 0 the log is a :class:`RankLog` that writes nothing.

        Raises:
            TunelabError: the config differs in keys that cannot change, the checkpoint was written by
                another number of processes, or the run is already finished.
        """
        metrics, samples = self.output_dir / "metrics.jsonl", self.output_dir / "samples.jsonl"
        main = self.runtime.is_main
        if resume_from is None:
            if main:
                clear_previous_run(self.output_dir)
                samples.parent.mkdir(parents=True, exist_ok=True)
                samples.write_text("")
            self.runtime.barrier()  # no rank writes a checkpoint before the old ones are gone
            return 0, MetricsLog(metrics, report_to=self.cfg.report_to, config_yaml=self.config_yaml) if main \
                else RankLog()
        check_resumed_config(resume_from, self.config_yaml, say=print if main else lambda _: None)
        self._check_world_size(resume_from)
        base_lrs = list(self.scheduler.base_lrs)  # this run's rates, not the checkpoint's
        state = load_checkpoint(resume_from, self.trainable, self.optimizer, self.scheduler, runtime=self.runtime)
        self.scheduler.base_lrs = base_lrs
        for group, base_lr, factor in zip(self.optimizer.param_groups, base_lrs, self.scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = base_lr, base_lr * factor(self.scheduler.last_epoch)
        if state.data_sha256 is not None and self.data_sha256 is not None and state.data_sha256 != self.data_sha256:
            raise TunelabError(
                f"--resume: the training prompts are not the ones checkpoint {resume_from} was trained on (sha256 "
                f"{state.data_sha256[:12]}… then, {self.data_sha256[:12]}… now): data.train was edited; the step "
                "count would point at other prompts. Restore the data to resume, or start again with --overwrite")
        self.set_extra(load_extra(resume_from))
        if state.step >= steps and run_finished(self.output_dir, state.step):
            raise TunelabError(f"--resume: {resume_from} is at step {state.step} and this config plans {steps} "
                               "steps, so the run is finished and nothing was changed; raise train.max_steps to "
                               "train further, or use --overwrite to start again")
        self.start_step = state.step
        if not main:
            return state.step, RankLog()
        MetricsLog(samples, resume_step=state.step)  # drops sample lines past the checkpoint
        return state.step, MetricsLog(metrics, resume_step=state.step, report_to=self.cfg.report_to,
                                      config_yaml=self.config_yaml)

    def _check_world_size(self, path: Path) -> None:
        saved = saved_world_size(path)
        if saved != self.runtime.world_size:
            raise TunelabError(
                f"--resume: checkpoint {path} was written by {saved} process(es) and this run has "
                f"{self.runtime.world_size}; an RL run resumes only on the world size that wrote it (each step's "
                f"prompts, rollout rows and mini-batches are cut by world_size × train.batch_size), so nothing "
                f"was changed: launch {saved} process(es) (torchrun --nproc-per-node {saved}), or start again "
                "with --overwrite")

    def save(self, step: int) -> Path:
        """Write the checkpoint of ``step`` RL steps done."""
        with writing_checkpoint(self.output_dir, step):
            return save_checkpoint(self.output_dir, self.trainable, self.optimizer, self.scheduler,
                                   TrainState(step=step, data_sha256=self.data_sha256), self.config_yaml, self.cfg.keep_last,
                                   runtime=self.runtime, extra=self.get_extra())

    def after_step(self, step: int, steps: int) -> None:
        """Call after RL step ``step`` (1-based): checkpoint every ``train.save_every``; on a stop
        signal, checkpoint and raise :class:`RunInterrupted`."""
        saved = None
        if self.cfg.save_every and step % self.cfg.save_every == 0 and step < steps:
            saved = self.save(step)
        if signum := self.stop.requested(self.runtime):
            raise RunInterrupted(signum, step, saved or self.save(step))

    def finish(self, steps: int) -> None:
        """Write the checkpoint after the last step, before the final files (unless this run resumed from
        it: then the final files are what is missing); on a stop signal since, raise :class:`RunInterrupted`."""
        final = self.save(steps) if self.start_step < steps else None
        if signum := self.stop.requested(self.runtime):
            raise RunInterrupted(signum, steps, final or self.output_dir / "checkpoints")


class RankLog:
    """The metrics log of a rank other than 0: records are computed the same on every rank, written once."""

    def write(self, record: dict[str, Any]) -> None:
        """Discard ``record`` (rank 0 writes it)."""

    def read(self) -> list[dict[str, Any]]:
        """Nothing (only rank 0 holds the log)."""
        return []

    def close(self) -> None:
        """Nothing to finish (rank 0's log reports to the trackers)."""
