"""PPO and GRPO on several processes: which prompts, rows and seeds are each rank's, and the step-wide sums.

The rule is the one SFT follows (:mod:`tunelab.training.distributed`): N ranks with ``train.batch_size``
b (and ``rl.mini_batch_size`` m) train exactly like one process with ``N·b`` (and ``N·m``):

* **Prompts.** Every rank draws the same ``N·b`` prompts of the step (:func:`tunelab.rollout.session.
  prompts_for_step`) and takes the contiguous share ``[r·b, (r+1)·b)`` (:func:`rank_prompts`); it samples
  all ``G`` completions of each of its prompts, so a GRPO group never spans ranks.
* **Seeds.** Row ``i`` of the step's global rollout (prompt ``i // G``, completion ``i % G``) samples from its
  own generator seeded by ``(train.seed, step, i)`` (:func:`row_seeds`), so what a row samples depends on
  neither the rank it lands on nor the other rows: N ranks sample what one process would, and a resumed
  run what the uninterrupted one did, with no sampler state to checkpoint.
* **Statistics.** Rewards, scores and per-token advantages stay on their rank; what must be global is
  all-reduced as ``(count, sum, sum of squares)`` (:func:`global_sums`): PPO's advantage whitening and
  score normalization, GRPO's ``scale_rewards: batch`` std. A rank whose rows hold no valid token adds
  zeros and still joins every collective.
* **Updates.** One permutation of all ``N·b·G`` rows (the same generator on every rank) cuts the global
  mini-batches; each rank trains on the rows of each mini-batch it owns (:func:`mini_batch_shares`),
  all ranks running as many micro-batches (a rank with fewer runs zero-weight ones, so DDP's all-reduce
  and FSDP's all-gathers line up), and the loss is divided by the global unit count
  (:func:`tunelab.rollout.batch.accumulate`); gradients are summed over ranks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from tunelab.rollout.prompts import Prompt
from tunelab.rollout.session import RLSession, prompts_for_step
from tunelab.training.distributed import Runtime

T = TypeVar("T")


def rank_prompts(step_prompts: list, rank: int, world_size: int) -> list:
    """Rank ``rank``'s contiguous share of the ``world_size · b`` prompts of a step.

    Raises:
        ValueError: the prompts do not split evenly over the ranks.
    """
    if len(step_prompts) % world_size:
        raise ValueError(f"{len(step_prompts)} prompts do not split over {world_size} ranks")
    share = len(step_prompts) // world_size
    return step_prompts[rank * share:(rank + 1) * share]


def step_prompts(session: RLSession, step: int, batch_size: int, seed: int, shuffle: bool) -> list[Prompt]:
    """This rank's ``batch_size`` prompts of RL step ``step`` (0-based): its share of the step's
    ``batch_size × world_size`` prompts."""
    runtime = session.runtime
    chosen = prompts_for_step(session.train.prompts, step, batch_size * runtime.world_size, seed, shuffle)
    return rank_prompts(chosen, runtime.rank, runtime.world_size)


def rank_row_seeds(runtime: Runtime, seed: int, step: int, num_rows: int) -> list[int]:
    """Seeds of this rank's ``num_rows`` rollout rows (every rank holds as many): global rows
    ``rank · num_rows ...`` of the step (:func:`row_seeds`)."""
    return row_seeds(seed, step, runtime.rank * num_rows, num_rows)


def with_whole_model(runtime: Runtime, fn: Callable[[], T]) -> T:
    """Run ``fn()`` (sampling and no-grad scoring) with the whole policy on this rank: under FSDP every shard
    is gathered (:meth:`~tunelab.training.distributed.Runtime.full_weights`, collective) and ``fn`` runs
    inside the wrapper's forward; under DDP or on one process it is just ``fn()``."""
    if runtime.strategy != "fsdp":
        return fn()
    with runtime.full_weights():
        return runtime.wrapped(lambda _root: fn())


def row_seeds(seed: int, step: int, first_row: int, num_rows: int) -> list[int]:
    """Sampling seeds of rows ``first_row ..`` of RL step ``step`` (0-based): a hash of (seed, step, row),
    63-bit, the same on every process and platform."""
    def one(row: int) -> int:
        digest = hashlib.blake2b(f"tunelab-rollout:{seed}:{step}:{row}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    return [one(first_row + i) for i in range(num_rows)]


def global_sums(runtime: Runtime, sums: torch.Tensor) -> torch.Tensor:
    """``sums`` (e.g. (3,) count, sum, sum of squares) added over all ranks; float64 on ``sums``' device.
    Collective: every rank calls it, including one whose share is empty (zeros)."""
    return torch.tensor(runtime.sum(sums.tolist()), dtype=torch.float64, device=sums.device)


def gather_rows(runtime: Runtime, values: torch.Tensor) -> torch.Tensor:
    """All ranks' ``values`` (R, ...) concatenated in rank order, on every rank (float64, on the CPU).

    Every rank must pass the same shape (each holds ``b·G`` rows). Collective; meant for the few numbers
    per row that the step's log reports (rewards, lengths), not for model tensors.
    """
    if runtime.world_size == 1:
        return values.detach().double().cpu()
    flat = values.detach().double().cpu().flatten()
    slots = torch.zeros(runtime.world_size, flat.numel(), dtype=torch.float64)
    slots[runtime.rank] = flat
    total = torch.tensor(runtime.sum(slots.flatten().tolist()), dtype=torch.float64)
    return total.reshape(runtime.world_size * values.shape[0], *values.shape[1:])


@dataclass
class MiniBatchShare:
    """This rank's rows (local indices, 1-D long) of one global mini-batch, and the micro-batches every
    rank runs for it (the most any rank needs, at least 1)."""

    rows: torch.Tensor
    num_micro_batches: int


def mini_batch_shares(rows_per_rank: int, mini_batch_size: int | None, micro_batch_size: int | None,
                      generator: torch.Generator, rank: int, world_size: int) -> list[MiniBatchShare]:
    """Cut one PPO epoch of the global rollout (``world_size · rows_per_rank`` rows, rank r holding rows
    ``[r·rows_per_rank, (r+1)·rows_per_rank)``) into mini-batches of ``world_size · mini_batch_size`` rows of
    a fresh permutation drawn from ``generator`` (one draw, identical on every rank), and return this rank's
    share of each. On one process this is a permutation of the batch cut into ``mini_batch_size`` rows.
    ``mini_batch_size`` / ``micro_batch_size`` None: the whole batch / the whole share at once."""
    total = rows_per_rank * world_size
    order = torch.randperm(total, generator=generator)
    size = (mini_batch_size or rows_per_rank) * world_size
    shares = []
    for start in range(0, total, size):
        chunk = order[start:start + size]
        owner = chunk // rows_per_rank
        counts = torch.bincount(owner, minlength=world_size).tolist()
        micro = max(max(1, math.ceil(c / micro_batch_size)) if micro_batch_size else 1 for c in counts)
        shares.append(MiniBatchShare(chunk[owner == rank] - rank * rows_per_rank, micro))
    return shares
