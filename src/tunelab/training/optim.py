"""AdamW with no-decay parameter groups, warmup + decay learning-rate schedules, and the clipped, checked step."""

from __future__ import annotations

import math

import torch
from torch import nn

from tunelab.config.schema import TrainConfig
from tunelab.errors import TunelabError


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters with ``requires_grad``, with their names."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101) over the trainable parameters.

    Weight decay is not applied to biases, norm weights, embeddings or LoRA-free 1-D tensors.
    Uses the fused CUDA kernel when every parameter is on a GPU.

    Raises:
        ValueError: the model has no trainable parameters.
    """
    named = trainable_parameters(model)
    if not named:
        raise ValueError("no trainable parameters: check train.method and lora.target_modules")
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for _, p in named)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=fused or None
    )


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Learning-rate factor (0..1) for optimizer ``step`` (0-based), independent of accumulation.

    Linear warmup from ``1/(warmup+1)`` to 1 over ``warmup_steps``, then cosine to 0, linear to 0
    or constant over the remaining steps.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(progress, 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepping once per optimizer step with :func:`lr_multiplier`."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup, cfg.schedule)
    )


def clip_grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """Global L2 norm of the gradients (before clipping), clipped to ``max_norm`` if given.

    Parameters without a gradient are skipped. Works on plain and FSDP-sharded (``DTensor``)
    gradients: the norm of sharded gradients is reduced over ranks before it is used.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def checked_step(optimizer: torch.optim.Optimizer, max_grad_norm: float | None, *, where: str, advice: str,
                 detail: str = "") -> float:
    """Clip the gradients (:func:`clip_grad_norm`), step the optimizer and zero the gradients.

    Returns the pre-clip gradient norm. The learning-rate scheduler is the caller's to step.

    Raises:
        TunelabError: the gradient norm is not finite (a NaN/inf loss or gradient). The gradients
            are cleared and nothing is updated, so the weights stay finite; the message reads
            ``"{where}: the gradient norm is {norm}{detail}; no update was applied, {advice}"``.
    """
    norm = clip_grad_norm([p for group in optimizer.param_groups for p in group["params"]], max_grad_norm)
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise TunelabError(f"{where}: the gradient norm is {norm}{detail}; no update was applied, {advice}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
