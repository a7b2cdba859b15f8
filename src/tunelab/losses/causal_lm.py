"""Causal language-model loss from final hidden states and the LM head, chunked.

The full ``[tokens, vocab]`` logits are never materialized: logits are formed for at most
``chunk_size`` supervised tokens at a time, in fp32, and the gradients with respect to the hidden
states (and the head weight, when it is trained) are computed in the same pass and kept, so the
backward pass does no recomputation. Only supervised positions are projected at all, which with
prompt-masked SFT skips the head for most tokens. Equivalent to
``F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`` in value and gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets for each position: ``labels[:, t + 1]``, with ``-100`` at the last position.

    Args:
        labels: (B, T) int64, ``-100`` where a token does not count.

    Returns:
        (B, T) int64 targets aligned with the hidden state that predicts them.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    normalizer: int | float,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    chunked: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed next-token cross-entropy divided by ``normalizer``.

    Args:
        hidden: (B, T, H) final hidden states (any float dtype).
        weight: (V, H) LM-head weight (may be tied to the input embeddings).
        labels: (B, T) int64 aligned with the inputs, ``-100`` = ignored; shifted internally.
        normalizer: number of supervised tokens the loss is averaged over — for gradient
            accumulation, the count over the whole accumulated batch, not this micro-batch.
        bias: optional (V,) LM-head bias.
        chunk_size: supervised tokens per logits chunk.
        chunked: False computes naive full logits (reference path).

    Returns:
        ``(loss, metrics)``: loss is a scalar in nats per supervised token of the accumulated
        batch; metrics has ``nll_sum`` (nats, detached) and ``num_tokens`` (supervised tokens here).
    """
    targets = shift_labels(labels).reshape(-1)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    t = targets.index_select(0, keep)
    if chunked:
        nll_sum = _ChunkedLinearCrossEntropy.apply(h, weight, bias, t, chunk_size, torch.is_grad_enabled())
    else:
        logits = F.linear(h, weight, bias).float()
        nll_sum = F.cross_entropy(logits, t, reduction="sum")
    loss = nll_sum / normalizer
    return loss, {"nll_sum": nll_sum.detach(), "num_tokens": torch.tensor(t.numel())}


def causal_lm_loss_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, normalizer: int | float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reference path: summed next-token cross-entropy of full logits, divided by ``normalizer``.

    Args:
        logits: (B, T, V) any float dtype; computed in fp32.
        labels: (B, T) int64, ``-100`` = ignored; shifted internally.

    Returns:
        Same as :func:`causal_lm_loss`.
    """
    targets = shift_labels(labels).reshape(-1)
    nll_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, reduction="sum")
    num_tokens = (targets != IGNORE_INDEX).sum()
    return nll_sum / normalizer, {"nll_sum": nll_sum.detach(), "num_tokens": num_tokens}


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i W^T + b, t_i) with gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size, grad_enabled):  # noqa: D102
        need_h = grad_enabled and h.requires_grad
        need_w = grad_enabled and weight.requires_grad
        need_b = grad_enabled and bias is not None and bias.requires_grad
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            h_c, t_c = h[start : start + chunk_size], targets[start : start + chunk_size]
            logits = F.linear(h_c, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t_c[:, None]).squeeze(1)).sum()
            if need_h or need_w or need_b:
                grad_logits = torch.exp(logits.sub_(lse[:, None]))
                grad_logits[torch.arange(t_c.numel(), device=t_c.device), t_c] -= 1.0
                if need_h:
                    grad_h[start : start + chunk_size] = grad_logits.to(weight.dtype) @ weight
                if need_w:
                    grad_w += grad_logits.t() @ h_c.float()
                if need_b:
                    grad_b += grad_logits.sum(0)
        ctx.save_for_backward(
            *(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b))
        )
        ctx.needs = (need_h, need_w, need_b)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        grad_h, grad_w, grad_b = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        return (
            (grad_h * grad_out).to(h_dtype) if need_h else None,
            (grad_w * grad_out).to(w_dtype) if need_w else None,
            (grad_b * grad_out).to(b_dtype) if need_b else None,
            None,
            None,
            None,
        )
