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
    label_smoothing: float = 0.0,
    with_predictions: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed next-token cross-entropy (label-smoothed if asked) divided by ``normalizer``.

    With label smoothing ε (Szegedy et al. 2016, arXiv:1512.00567, Sec. 7; PyTorch's definition) each
    supervised token contributes ``(1 - ε) · (-log p(target)) + ε · mean_v(-log p(v))`` over the V
    vocabulary entries; the sum over tokens is divided by ``normalizer`` exactly as without smoothing,
    so accumulation, packing and sharding leave the value unchanged.

    Args:
        hidden: (B, T, H) final hidden states (any float dtype).
        weight: (V, H) LM-head weight (may be tied to the input embeddings).
        labels: (B, T) int64 aligned with the inputs, ``-100`` = ignored; shifted internally.
        normalizer: number of supervised tokens the loss is averaged over — for gradient
            accumulation, the count over the whole accumulated batch, not this micro-batch.
        bias: optional (V,) LM-head bias.
        chunk_size: supervised tokens per logits chunk.
        chunked: False computes naive full logits (reference path).
        label_smoothing: ε in [0, 1); 0 = plain cross-entropy.
        with_predictions: also return the argmax predictions (for evaluation metrics).

    Returns:
        ``(loss, metrics)``: loss is a scalar in nats per supervised token of the accumulated
        batch; metrics (detached) has ``nll_sum`` (plain NLL in nats, unsmoothed), ``num_tokens``
        (supervised tokens here) and ``num_correct`` (of them, how many the argmax predicts), plus
        with ``with_predictions`` ``predictions`` and ``targets``: (N,) int64 over the N supervised
        positions in row-major order. No full-vocabulary logits are returned or kept.
    """
    targets = shift_labels(labels).reshape(-1)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    t = targets.index_select(0, keep)
    if chunked:
        loss_sum, nll_sum, predictions = _ChunkedLinearCrossEntropy.apply(
            h, weight, bias, t, chunk_size, torch.is_grad_enabled(), label_smoothing)
    else:
        loss_sum, nll_sum, predictions = _smoothed_ce_sum(F.linear(h, weight, bias).float(), t, label_smoothing)
    return loss_sum / normalizer, _token_metrics(nll_sum, predictions, t, with_predictions)


def causal_lm_loss_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, normalizer: int | float, *, label_smoothing: float = 0.0,
    with_predictions: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reference path: summed next-token cross-entropy of full logits, divided by ``normalizer``.

    Args:
        logits: (B, T, V) any float dtype; computed in fp32.
        labels: (B, T) int64, ``-100`` = ignored; shifted internally.
        label_smoothing, with_predictions: as in :func:`causal_lm_loss`.

    Returns:
        Same as :func:`causal_lm_loss`.
    """
    targets = shift_labels(labels).reshape(-1)
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    t = targets.index_select(0, keep)
    loss_sum, nll_sum, predictions = _smoothed_ce_sum(
        logits.reshape(-1, logits.shape[-1]).index_select(0, keep).float(), t, label_smoothing)
    return loss_sum / normalizer, _token_metrics(nll_sum, predictions, t, with_predictions)


def _smoothed_ce_sum(logits: torch.Tensor, targets: torch.Tensor,
                     label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, V) fp32 logits, (N,) targets → (smoothed CE sum, plain NLL sum detached, (N,) argmax)."""
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    loss = nll if label_smoothing == 0 else (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    return loss.sum(), nll.detach().sum(), logits.detach().argmax(-1)


def _token_metrics(nll_sum: torch.Tensor, predictions: torch.Tensor, targets: torch.Tensor,
                   with_predictions: bool) -> dict[str, torch.Tensor]:
    metrics = {"nll_sum": nll_sum.detach(), "num_tokens": torch.tensor(targets.numel()),
               "num_correct": (predictions == targets).sum().cpu()}
    if with_predictions:
        metrics.update(predictions=predictions, targets=targets)
    return metrics


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE_ε(h_i W^T + b, t_i) with gradients computed chunk by chunk in forward.

    Returns (smoothed loss sum, plain NLL sum, (N,) argmax predictions); only the first is
    differentiable. d CE_ε / d logits = softmax - (1 - ε) · onehot(t) - ε / V.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size, grad_enabled, label_smoothing):  # noqa: D102
        need_h = grad_enabled and h.requires_grad
        need_w = grad_enabled and weight.requires_grad
        need_b = grad_enabled and bias is not None and bias.requires_grad
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        nll_total = torch.zeros((), dtype=torch.float32, device=h.device)
        predictions = torch.empty_like(targets)
        eps = label_smoothing
        for start in range(0, h.shape[0], chunk_size):
            h_c, t_c = h[start : start + chunk_size], targets[start : start + chunk_size]
            logits = F.linear(h_c, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            nll = (lse - logits.gather(1, t_c[:, None]).squeeze(1)).sum()
            nll_total += nll
            total += nll if eps == 0 else (1 - eps) * nll + eps * (lse - logits.mean(-1)).sum()
            predictions[start : start + chunk_size] = logits.argmax(-1)
            if need_h or need_w or need_b:
                grad_logits = torch.exp(logits.sub_(lse[:, None]))
                grad_logits[torch.arange(t_c.numel(), device=t_c.device), t_c] -= 1.0 - eps
                if eps:
                    grad_logits -= eps / logits.shape[-1]
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
        ctx.mark_non_differentiable(nll_total, predictions)
        return total, nll_total, predictions

    @staticmethod
    def backward(ctx, grad_out, _grad_nll, _grad_predictions):  # noqa: D102
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
            None,
        )
