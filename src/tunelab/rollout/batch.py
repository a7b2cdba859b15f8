"""A rollout batch (prompts, sampled completions, rewards) and exact micro-batch accumulation.

Row layout: :func:`rollout` makes GRPO groups contiguous (rows ``[g*G:(g+1)*G]`` are the G
completions of prompt g) and records each row's prompt in ``prompt_index``; advantages are grouped
by that id (:func:`tunelab.losses.advantages.grpo_advantages`), never by row position, so a caller
that reorders or interleaves rows stays correct.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from tunelab.config.rl import RLConfig
from tunelab.rollout.generate import sample_completions
from tunelab.rollout.prompts import Prompt, collate_prompts
from tunelab.rollout.rewards import RewardInputs
from tunelab.training.distributed import Runtime, single_process
from tunelab.training.optim import checked_step


@dataclass
class RolloutBatch:
    """Tensors of one rollout, all with B rows (P prompt and C completion columns).

    ``prompt_ids``/``prompt_mask`` (B, P) left-padded; ``completion_ids``/``completion_mask`` (B, C)
    right-padded; ``loss_mask`` (B, C) bool = the completion tokens that count in the loss
    (``completion_mask``, minus truncated rows when ``rl.mask_truncated``); ``truncated`` (B,) bool;
    ``prompt_index`` (B,) long: which prompt of the step each row answers (None: unknown);
    ``extra``: per-row tensors added later (old/ref log-probs, advantages, returns, values).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    loss_mask: torch.Tensor
    truncated: torch.Tensor
    prompt_index: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, rows: torch.Tensor) -> RolloutBatch:
        """The sub-batch of ``rows`` (1-D long, may be empty), completion columns trimmed to its longest reply."""
        lengths = self.completion_mask[rows].sum(dim=1)
        width = max(1, int(lengths.max())) if lengths.numel() else 1
        out = {f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
               for f in fields(self) if f.name != "extra"}
        for key in ("completion_ids", "completion_mask", "loss_mask"):
            out[key] = out[key][:, :width]
        extra = {k: (v[rows][:, :width] if v.dim() == 2 else v[rows]) for k, v in self.extra.items()}
        return RolloutBatch(**out, extra=extra)


@torch.no_grad()
def rollout(
    model: nn.Module, tokenizer: Any, prompts: list[Prompt], rl: RLConfig, *, num_generations: int,
    stop_ids: list[int], device: torch.device, greedy: bool = False, row_seeds: list[int] | None = None,
) -> tuple[RolloutBatch, RewardInputs]:
    """Sample ``num_generations`` completions per prompt (group-contiguous rows).

    ``row_seeds`` (one per row, ``len(prompts) · num_generations``): each row samples from its own seeded
    generator (:func:`tunelab.rollout.generate.sample_completions`; :func:`tunelab.rollout.shards.row_seeds`).

    Returns the batch and the decoded :class:`RewardInputs` (completions decoded without special tokens).
    """
    repeated = [p for p in prompts for _ in range(num_generations)]
    prompt_ids, prompt_mask = collate_prompts(repeated, tokenizer.pad_token_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    out = sample_completions(model, prompt_ids, prompt_mask, max_new_tokens=rl.max_new_tokens, stop_ids=stop_ids,
                             pad_id=tokenizer.pad_token_id, temperature=rl.temperature, top_p=rl.top_p, greedy=greedy,
                             row_seeds=row_seeds)
    loss_mask = out.completion_mask & ~out.truncated[:, None] if rl.mask_truncated else out.completion_mask
    prompt_index = torch.arange(len(prompts), device=device).repeat_interleave(num_generations)
    batch = RolloutBatch(prompt_ids, prompt_mask, out.completion_ids, out.completion_mask, loss_mask, out.truncated,
                         prompt_index)
    texts = [tokenizer.decode(ids[mask], skip_special_tokens=True).strip()
             for ids, mask in zip(out.completion_ids.cpu(), out.completion_mask.cpu())]
    inputs = RewardInputs(prompts=[p.text for p in repeated], messages=[p.messages for p in repeated],
                          completions=texts, num_tokens=out.completion_mask.sum(dim=1).tolist(),
                          examples=[p.example for p in repeated])
    return batch, inputs


def loss_units(mask: torch.Tensor, normalization: str) -> int:
    """What a loss averages over: real tokens (``token``) or rows with at least one (``sequence``)."""
    return int(mask.sum()) if normalization == "token" else int(mask.any(dim=1).sum())


def accumulate(
    batch: RolloutBatch, micro_batch_size: int | None, normalization: str,
    loss_fn: Callable[[RolloutBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]], *,
    runtime: Runtime | None = None, num_micro_batches: int | None = None, filler: RolloutBatch | None = None,
) -> dict[str, float]:
    """Backward ``loss_fn`` over micro-batches so the gradient equals one pass over ``batch``.

    ``loss_fn`` returns a loss averaged over its own micro-batch's units (see :func:`loss_units`
    on ``loss_mask``); each is weighted by its share of the mini-batch's units before
    ``backward()``, so padding, masked and truncated-and-masked tokens are never counted in any
    denominator. Returns unit-weighted means of the metrics (and ``loss``).

    With a distributed ``runtime`` (:mod:`tunelab.rollout.shards`), ``batch`` is this rank's share of a
    global mini-batch (possibly no rows): the unit count is all-reduced, so each rank's losses are
    weighted by their share of the *global* units and the summed gradients equal one process's; the
    loss runs inside the DDP/FSDP wrapper (``runtime.wrapped``), gradients are synchronized on the last
    micro-batch only, and every rank runs ``num_micro_batches`` micro-batches: one with no rows or no
    units runs ``filler`` (a row of this rank's rollout) at weight 0, so collectives line up. The
    returned metrics are summed over ranks (the same on every rank).
    """
    runtime = runtime or single_process()
    size = len(batch)
    step = micro_batch_size or max(size, 1)
    count = num_micro_batches or max(1, -(-size // step))
    local_units = loss_units(batch.loss_mask, normalization) if size else 0
    total_units = int(runtime.sum([local_units])[0])
    sums: dict[str, float] = {}
    for index in range(count):
        start = index * step
        micro = batch.select(torch.arange(start, min(start + step, size), device=batch.prompt_ids.device)) \
            if start < size else None
        units = loss_units(micro.loss_mask, normalization) if micro is not None else 0
        if units == 0 and not runtime.is_distributed:
            continue
        weight = units / total_units if units else 0.0
        with runtime.gradient_sync(index == count - 1):
            loss, metrics = _forward(runtime, loss_fn, micro if units else (filler or micro))
            (loss * weight).backward()
        if not units:
            continue
        for key, value in {"loss": loss.detach(), **metrics}.items():
            share = 1.0 if key.endswith("num_tokens") else weight  # counts add up, averages are weighted
            sums[key] = sums.get(key, 0.0) + share * float(value)
    return runtime.sum_dicts(sums)


def _forward(runtime: Runtime, loss_fn, micro: RolloutBatch):
    """``loss_fn(micro)`` inside the runtime's DDP/FSDP wrapper when there is one (it must run in its forward)."""
    if micro is None:
        raise RuntimeError("a rank with no rows in a mini-batch needs a filler row to join the collectives")
    if runtime.wrapped is None:
        return loss_fn(micro)
    return runtime.wrapped(lambda _root: loss_fn(micro))


def optimizer_step(optimizer, scheduler, max_grad_norm: float | None) -> float:
    """:func:`~tunelab.training.optim.checked_step` then the scheduler; returns the pre-clip norm.

    Raises:
        TunelabError: the gradient norm is not finite; nothing is updated (the weights stay finite).
    """
    norm = checked_step(optimizer, max_grad_norm, where="RL update",
                        advice="lower train.lr or set train.max_grad_norm")
    scheduler.step()
    return norm
