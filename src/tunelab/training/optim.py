"""AdamW with no-decay parameter groups, warmup + decay learning-rate schedules, and the clipped, checked step."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from tunelab.config.schema import TrainConfig
from tunelab.errors import TunelabError


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters with ``requires_grad``, with their names."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101) over the trainable parameters.

    Weight decay is applied only to the parameters :func:`no_decay_parameters` leaves out
    (embeddings, normalisation weights, biases and other 1-D tensors are not decayed).
    Uses the fused CUDA kernel when every parameter is on a GPU.

    Raises:
        ValueError: the model has no trainable parameters.
    """
    named = trainable_parameters(model)
    if not named:
        raise ValueError("no trainable parameters: check train.method and lora.target_modules")
    skip = {id(p) for p in no_decay_parameters(model)}
    decay = [p for _, p in named if id(p) not in skip]
    no_decay = [p for _, p in named if id(p) in skip]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for _, p in named)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=fused or None
    )


def is_norm_module(module: nn.Module) -> bool:
    """True for a normalisation layer of any architecture: torch's norms, the classes transformers lists
    in ``ALL_LAYERNORM_LAYERS``, and any class (or base class) whose name ends in ``Norm`` or
    ``Norm<N>d`` (``LlamaRMSNorm``, ``GemmaRMSNorm``, ``T5LayerNorm``, ``Qwen2RMSNorm``, ...:
    transformers defines one per model and lists few of them)."""
    from torch.nn.modules.batchnorm import _NormBase
    from transformers import pytorch_utils

    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm, _NormBase,
                  *getattr(pytorch_utils, "ALL_LAYERNORM_LAYERS", ()))
    return isinstance(module, norm_types) or any(_NORM_NAME.search(cls.__name__) for cls in type(module).__mro__)


_NORM_NAME = re.compile(r"Norm(\d+d)?$")


def no_decay_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that weight decay must skip, chosen by module type and shape, never by name.

    * every parameter of an ``nn.Embedding`` (or of the model's input embeddings): GPT-2's
      ``wte``/``wpe``, Llama's ``embed_tokens``; a tied LM head is the same tensor, so it is skipped too;
    * every parameter of a normalisation module (:func:`is_norm_module`);
    * every parameter with fewer than 2 dimensions (biases, norm gains, scalars).

    Returns each such parameter once, in ``model.parameters()`` order (trainable or not).
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    skip: dict[int, nn.Parameter] = {}
    for module in model.modules():
        whole = isinstance(module, nn.Embedding) or module is embeddings or is_norm_module(module)
        for param in module.parameters(recurse=False):
            if whole or param.ndim < 2:
                skip[id(param)] = param
    return [p for p in model.parameters() if id(p) in skip]


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Learning-rate factor (0..1) for optimizer ``step`` (0-based), independent of accumulation.

    The PyTorch/transformers warmup convention, counted so that the first update already moves:
    with ``warmup_steps = w`` the 1st optimizer step uses ``lr / w``, the k-th ``k · lr / w``, and
    step ``w`` reaches the peak ``lr``. After the peak the factor decays over the remaining
    ``total_steps - w`` steps: cosine or linear towards 0 (reached one step after the last), or
    constant. ``w = 0`` starts at the peak.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    peak = warmup_steps - 1 if warmup_steps > 0 else 0  # 0-based index of the step at the peak
    progress = (step - peak) / max(1, total_steps - peak)
    progress = min(progress, 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR stepping once per optimizer step with :func:`lr_multiplier`; warmup is
    ``train.warmup_steps``, else ``int(train.warmup_ratio × total_steps)``."""
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
