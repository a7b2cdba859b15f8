"""Token- and sequence-level log-probabilities for causal language models.

These are the building blocks every likelihood-based loss in
:mod:`tunelab.losses` consumes. All functions are pure functions of tensors.

Conventions
-----------
* Shapes use named dims: ``B`` batch rows, ``T`` tokens, ``V`` vocabulary.
* Log-probabilities are natural logs (units: nats) and are computed in
  float32 (float64 inputs stay float64) regardless of the logits dtype, so
  bf16/fp16 logits do not lose precision in the softmax normaliser.
* Boolean masks are ``True`` where a token counts. Labels use ``-100``
  (``IGNORE_INDEX``) for positions that must be ignored (prompt, padding).
"""

from __future__ import annotations

import torch

__all__ = [
    "IGNORE_INDEX",
    "entropy_from_logits",
    "log1mexp",
    "sequence_logps",
    "token_logps",
]

IGNORE_INDEX = -100


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return float64 for float64 inputs and float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Cast a floating tensor to at least float32 (float64 is kept as is)."""
    return x.to(_compute_dtype(x.dtype))


def token_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the next-token labels.

    The causal shift is done here: output position ``t`` holds
    ``log p(labels[:, t + 1] | logits[:, t])``, so both outputs have length
    ``T - 1`` along dim 1. Pass the *unshifted* ``labels`` aligned with the
    model inputs (the usual ``labels = input_ids`` with prompt/padding set to
    ``ignore_index``).

    Args:
        logits: ``(B, T, V)`` float (any precision) unnormalised scores.
        labels: ``(B, T)`` long token ids; ``ignore_index`` (default -100)
            marks positions that do not count.
        ignore_index: label value that is masked out.

    Returns:
        ``(logps, mask)``:
        ``logps`` ``(B, T-1)`` float32 (float64 if logits are float64) in
        nats, exactly 0 where masked; ``mask`` ``(B, T-1)`` bool, True where
        the shifted label counts. No reduction.

    Memory: for float32/float64 logits we gather the label logit and
    subtract ``logsumexp`` (no ``(B, T, V)`` log-softmax is kept); for
    half-precision logits the float32 upcast is done one batch row at a time
    so at most one ``(T, V)`` float32 copy exists at once.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits (B,T,V) and labels (B,T), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    shifted_logits = logits[:, :-1, :]
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != ignore_index
    safe_labels = torch.where(mask, shifted_labels, torch.zeros_like(shifted_labels))
    index = safe_labels.unsqueeze(-1)
    dtype = _compute_dtype(logits.dtype)

    if logits.dtype == dtype:
        picked = torch.gather(shifted_logits, -1, index).squeeze(-1)
        logps = picked - torch.logsumexp(shifted_logits, dim=-1)
    else:
        rows = []
        for row_logits, row_index in zip(shifted_logits, index):
            row_logps = torch.log_softmax(row_logits.to(dtype), dim=-1)
            rows.append(torch.gather(row_logps, -1, row_index).squeeze(-1))
        logps = torch.stack(rows) if rows else shifted_logits.new_zeros(
            shifted_labels.shape, dtype=dtype
        )
    logps = torch.where(mask, logps, torch.zeros_like(logps))
    return logps, mask


def sequence_logps(
    logps: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-token log-probabilities over the tokens that count.

    Args:
        logps: ``(B, T)`` float per-token log-probs in nats (e.g. the first
            output of :func:`token_logps`, where ``T`` is already shifted).
        mask: ``(B, T)`` bool, True where a token counts.

    Returns:
        ``(seq_logps, num_tokens)``: ``seq_logps`` ``(B,)`` same dtype as
        ``logps``, the *summed* log-prob ``log pi(y | x)`` in nats (reduction:
        sum over masked tokens, 0 for an all-masked row); ``num_tokens``
        ``(B,)`` long, the number of counted tokens. Divide the two for the
        length-averaged log-prob used by SimPO/ORPO.
    """
    if logps.shape != mask.shape:
        raise ValueError(f"logps {tuple(logps.shape)} vs mask {tuple(mask.shape)}")
    mask = mask.bool()
    seq = torch.where(mask, logps, torch.zeros_like(logps)).sum(dim=-1)
    return seq, mask.sum(dim=-1, dtype=torch.long)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution ``softmax(logits)`` in nats.

    Args:
        logits: ``(..., V)`` float (any precision); ``-inf`` entries (banned
            tokens) are allowed and contribute 0.

    Returns:
        ``(...)`` float32 (float64 for float64 input) entropy
        ``H = -sum_v p_v log p_v`` in nats. No reduction over leading dims.
    """
    logps = torch.log_softmax(upcast(logits), dim=-1)
    probs = logps.exp()
    # 0 * -inf would be NaN; clamping log p to the dtype minimum makes those
    # terms exactly 0 without changing any finite term.
    finite_logps = logps.clamp(min=torch.finfo(logps.dtype).min)
    return -(probs * finite_logps).sum(dim=-1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """Numerically stable ``log(1 - exp(x))`` for ``x <= 0``, exact to the dtype's precision.

    Uses ``log(-expm1(x))`` for ``x > -ln 2`` and ``log1p(-exp(x))`` otherwise
    (Maechler 2012, "Accurately computing log(1 - exp(-|a|))", Eq. 7). Any
    ``x < 0`` the dtype can hold is computed without bias (e.g. ``x = -1e-9``
    in float32 gives ``log(1e-9)``, not the value at ``-eps``). Only ``x = 0``
    itself (a probability of exactly 1), whose true value is ``-inf``, is moved
    to the smallest normal magnitude ``-finfo.tiny``, giving a finite result
    (about -87.3 in float32, -708.4 in float64) and, like any clamp, zero
    gradient there. Each branch of the ``torch.where`` is fed only inputs
    from its own domain, so the unused branch cannot turn gradients into NaN.

    Args:
        x: any shape, floating, ``<= 0`` (nats: a log-probability).

    Returns:
        Same shape and dtype as ``x``; finite, with finite gradients, for every
        finite ``x <= 0``.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = x > -0.6931471805599453
    minus_one = torch.full_like(x, -1.0)
    near = torch.log(-torch.expm1(torch.where(near_zero, x, minus_one)))
    far = torch.log1p(-torch.exp(torch.where(near_zero, minus_one, x)))
    return torch.where(near_zero, near, far)
