"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

The adapted weight is ``W' = m · (W + ΔW) / ||W + ΔW||_c`` (Eq. 5), with ``ΔW = s · B A`` the LoRA
update, ``m`` a trainable magnitude per output feature and ``||·||_c`` the L2 norm of each output
row (the paper's "column" norm of the transposed weight). ``m`` starts at ``||W||_c``, so with
``B = 0`` the adapted layer equals the base layer exactly.

Following §4.3 the norm ``||W + ΔW||_c`` is treated as a constant in backward (detached), so it
costs no extra activation memory; ``m`` and ``B A`` still get the gradients PEFT computes.

The forward never builds ``W'``: with ``f = m / ||W + ΔW||_c`` (shape (out,)),
``W' x = f ⊙ (W x) + f ⊙ (s · B A x)``, so the extra output on top of the base layer's is
``(f - 1) ⊙ (W x) + f ⊙ (s · B A x)`` (PEFT's formulation, bias excluded from the scaling). With
LoRA dropout active, ``W x`` in the extra term is recomputed on the dropped-out input, as PEFT does.

Deliberate simplifications: only linear layers (no DoRA for embeddings or convolutions); the
norm is not cached across steps (PEFT's optional inference cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def row_norm(weight: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
    """``||W + ΔW||_c``: the L2 norm of each output row, computed in float32.

    Args:
        weight: (out_features, in_features) base weight, any float dtype.
        delta: (out_features, in_features) update, or None for the base alone.

    Returns:
        (out_features,) float32 norms (no gradient when the inputs have none).
    """
    full = weight.float() if delta is None else weight.float() + delta.float()
    return torch.linalg.vector_norm(full, dim=1)


def dora_extra_output(
    x: torch.Tensor, base_out: torch.Tensor | None, weight: torch.Tensor, lora_A: torch.Tensor,
    lora_B: torch.Tensor, scaling: float, magnitude: torch.Tensor,
) -> torch.Tensor:
    """What DoRA adds to the base layer's output (Eq. 5 rewritten, see the module docstring).

    Args:
        x: (..., in_features) LoRA input (after dropout, if any).
        base_out: (..., out_features) ``W x`` without bias for this same ``x``, or None to compute
            it here (needed when dropout changed ``x``).
        weight: (out_features, in_features) the frozen base weight (dense, dequantized if stored
            quantized).
        lora_A: (r, in_features), lora_B: (out_features, r) LoRA factors.
        scaling: ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).
        magnitude: (out_features,) trainable magnitude ``m``.

    Returns:
        (..., out_features) in the dtype of the matmuls (the input's, or autocast's).
    """
    delta = (lora_B @ lora_A).detach() * scaling
    factor = magnitude / row_norm(weight.detach(), delta).detach()
    lora_out = F.linear(F.linear(x, lora_A) * scaling, lora_B)
    if base_out is None:
        base_out = F.linear(x, weight.to(lora_out.dtype))
    factor = factor.to(lora_out.dtype)
    return (factor - 1) * base_out + factor * lora_out


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W' = f ⊙ (W + ΔW)`` with ``f = m / ||W + ΔW||_c``, and ``f`` itself (kept for unmerge).

    Args:
        weight: (out, in) base weight; delta: (out, in) ``s · B A``; magnitude: (out,).

    Returns:
        (merged (out, in) float32, factor (out,) float32).
    """
    factor = magnitude.float() / row_norm(weight, delta)
    return factor[:, None] * (weight.float() + delta.float()), factor


def unmerged_weight(merged: torch.Tensor, delta: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Invert :func:`merged_weight`: ``W = W' / f - ΔW`` (float32; exact up to rounding)."""
    return merged.float() / factor[:, None] - delta.float()
