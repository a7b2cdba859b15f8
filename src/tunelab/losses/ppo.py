"""PPO clipped policy/value losses and the GRPO loss.

Conventions: B sequences, T completion tokens. ``logps``/``old_logps``/
``ref_logps`` are (B, T) per-token log-probabilities (nats) of the sampled
completion tokens under the current policy (carries grad), the rollout
policy, and the frozen reference model. ``mask`` is (B, T) ``torch.bool``,
True where a completion token is real and counts. ``old_logps``,
``ref_logps``, ``advantages``, ``returns`` and ``old_values`` are treated as
constants (detached). Inputs in half precision are upcast to float32; the
loss is a float32 (or float64) scalar. Values at padding positions never
reach the loss or its gradient, even if they are inf/NaN.

Each loss returns ``(loss, metrics)``: ``loss`` a scalar tensor to minimize,
``metrics`` a dict of detached scalar tensors. Reductions are over the tokens
of this call only (no cross-device or cross-micro-batch normalization).
"""

from __future__ import annotations

import torch

from tunelab.losses.advantages import _check_finite, _check_mask, _float, masked_mean
from tunelab.losses.kl import KL_ESTIMATORS

__all__ = ["ppo_policy_loss", "ppo_value_loss", "grpo_loss"]


def _sanitize(mask: torch.Tensor, x: torch.Tensor, detach: bool) -> torch.Tensor:
    """Upcast ``x`` and replace padding by 0 (via ``where``, so no NaN gradients)."""
    x = _float(x.detach() if detach else x)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _clipped_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``max(-A r, -A clip(r, 1-eps, 1+eps))``, the clipped mask, and ``r``.

    A token counts as clipped when the clipped branch is strictly larger, i.e.
    it is selected and its gradient w.r.t. ``log_ratio`` is zero.
    """
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return torch.maximum(unclipped, clipped), clipped > unclipped, ratio


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, Eq. 7), token level.

    ``loss = mean_{real tokens} max(-A_t r_t, -A_t clip(r_t, 1-eps, 1+eps))``
    with ``r_t = exp(logps_t - old_logps_t)``, i.e. the negated L^CLIP,
    averaged over all real tokens of the batch (0 if there are none).

    Args:
        logps, old_logps: (B, T) nats.
        advantages: (B, T) per-token advantages (e.g. whitened ``gae`` output);
            must be finite at real tokens.
        mask: (B, T) bool, True = real completion token.
        clip_eps: epsilon of the clip range, > 0.

    Returns:
        ``(loss, metrics)`` with metrics (means over real tokens):
        ``policy/clip_frac`` fraction of tokens whose clipped branch is active,
        ``policy/approx_kl`` k3 estimate of KL(old || new) in nats,
        ``policy/ratio_mean`` mean ratio.
    """
    _check_mask(mask, logps, old_logps, advantages)
    adv = _sanitize(mask, advantages, detach=True)
    _check_finite(adv, "advantages")
    log_ratio = _sanitize(mask, logps, detach=False) - _sanitize(mask, old_logps, detach=True)
    per_token, clipped, ratio = _clipped_surrogate(log_ratio, adv, clip_eps)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        metrics = {
            "policy/clip_frac": masked_mean(clipped.to(loss.dtype), mask),
            # k3 with samples from the old policy: (r - 1) - log r, r = new / old.
            "policy/approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def _explained_variance(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``1 - Var(target - pred) / Var(target)`` over real entries; NaN if Var(target) == 0."""
    var_t = masked_mean((target - masked_mean(target, mask)) ** 2, mask)
    resid = target - pred
    var_r = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
    return torch.where(var_t > 0, 1.0 - var_r / var_t, torch.full_like(var_t, float("nan")))


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss as in OpenAI baselines PPO2 and InstructGPT/TRL PPO.

    ``v_clip = old_values + clip(values - old_values, -eps, eps)`` and
    ``loss = 0.5 * mean_{real tokens} max((values - R)^2, (v_clip - R)^2)``
    (not in the PPO paper, which uses unclipped ``(V - R)^2``, Eq. 9).

    Args:
        values: (B, T) current value predictions (carry grad).
        old_values: (B, T) value predictions at rollout time.
        returns: (B, T) targets R (e.g. ``gae`` returns).
        mask: (B, T) bool, True = real completion token.
        clip_eps: clip range for the value change, > 0 (in reward units).

    Returns:
        ``(loss, metrics)``: ``value/clip_frac`` fraction of real tokens where
        the clipped term is strictly larger (zero gradient there), and
        ``value/explained_variance`` = ``1 - Var(R - v) / Var(R)`` over real
        tokens (population variances; NaN when Var(R) == 0 or no real token).
    """
    _check_mask(mask, values, old_values, returns)
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    v = _sanitize(mask, values, detach=False)
    old = _sanitize(mask, old_values, detach=True)
    ret = _sanitize(mask, returns, detach=True)
    v_clipped = old + torch.clamp(v - old, -clip_eps, clip_eps)
    loss_unclipped = (v - ret) ** 2
    loss_clipped = (v_clipped - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        metrics = {
            "value/clip_frac": masked_mean((loss_clipped > loss_unclipped).to(loss.dtype), mask),
            "value/explained_variance": _explained_variance(v, ret, mask),
        }
    return loss, metrics


def _reduce(per_token: torch.Tensor, mask: torch.Tensor, normalization: str) -> torch.Tensor:
    """Token-level or sequence-level masked mean; rows without real tokens excluded."""
    summed = torch.where(mask, per_token, torch.zeros_like(per_token))
    if normalization == "token":
        return summed.sum() / mask.sum().clamp(min=1)
    counts = mask.sum(dim=1)
    per_seq = summed.sum(dim=1) / counts.clamp(min=1)
    valid = counts > 0
    return (per_seq * valid).sum() / valid.sum().clamp(min=1)


def _check_grpo_args(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logps: torch.Tensor | None,
    beta: float,
    normalization: str,
) -> None:
    """Validate ``grpo_loss`` inputs; raise TypeError/ValueError with a clear message."""
    _check_mask(mask, logps, old_logps, *([] if ref_logps is None else [ref_logps]))
    if advantages.shape != mask.shape[:1]:
        raise ValueError(
            f"advantages must have shape ({mask.shape[0]},), got {tuple(advantages.shape)}"
        )
    _check_finite(advantages, "advantages")
    if normalization not in ("token", "sequence"):
        raise ValueError(f"normalization must be 'token' or 'sequence', got {normalization!r}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logps is None:
        raise ValueError("ref_logps is required when beta > 0")


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    normalization: str = "token",
    kl_estimator: str = "k3",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss (Shao et al. 2024, arXiv:2402.03300, Eq. 3 with the KL of Eq. 4).

    Per real token: ``max(-A_i r, -A_i clip(r, 1-eps, 1+eps)) + beta * KL``,
    where ``A_i`` is the sequence advantage broadcast over its tokens,
    ``r = exp(logps - old_logps)`` and ``KL`` the chosen per-token estimator of
    :data:`tunelab.losses.kl.KL_ESTIMATORS` (default the paper's
    ``k3 = exp(ref - logp) - (ref - logp) - 1``). With a single update per
    rollout, ``old_logps == logps.detach()``.

    Reduction (``normalization``):
        * ``"token"``: sum over all real tokens of the batch / number of real
          tokens (DAPO token-level loss, Yu et al. 2025, arXiv:2503.14476).
        * ``"sequence"``: mean over each row's real tokens, then mean over
          rows (Eq. 3's ``1/G sum_i 1/|o_i| sum_t``).
        Only mask-True tokens are counted; rows with zero real tokens are
        excluded from both numerator and denominator. A batch with no real
        token gives loss 0 (still differentiable, zero gradient).

    Args:
        logps, old_logps: (B, T) nats.
        advantages: (B,) per-sequence advantages (``grpo_advantages``); finite.
        mask: (B, T) bool, True = real completion token.
        clip_eps: > 0.
        ref_logps: (B, T) reference log-probs; required when ``beta > 0``.
        beta: KL weight >= 0.
        normalization: ``"token"`` or ``"sequence"``.
        kl_estimator: ``k1``, ``k2``, ``k3`` or ``abs`` (Schulman 2020).

    Returns:
        ``(loss, metrics)``: ``policy/clip_frac`` (mean over real tokens),
        ``policy/kl`` (mean over real tokens of the SAME estimator that enters
        the loss, nats; only if ``ref_logps`` is given), ``policy/num_tokens``
        (number of real tokens, float).

    Raises:
        ValueError: bad shapes/dtypes, ``beta > 0`` without ``ref_logps``, or an
            unknown ``normalization`` / ``kl_estimator``.
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {kl_estimator!r}")
    _check_grpo_args(logps, old_logps, advantages, mask, ref_logps, beta, normalization)
    lp = _sanitize(mask, logps, detach=False)
    log_ratio = lp - _sanitize(mask, old_logps, detach=True)
    adv = _float(advantages.detach())[:, None].expand_as(log_ratio)
    per_token, clipped, _ = _clipped_surrogate(log_ratio, adv, clip_eps)
    metrics: dict[str, torch.Tensor] = {}
    if ref_logps is not None:
        kl = KL_ESTIMATORS[kl_estimator](lp, _sanitize(mask, ref_logps, detach=True))
        if beta > 0:
            per_token = per_token + beta * kl
        metrics["policy/kl"] = masked_mean(kl.detach(), mask)
    loss = _reduce(per_token, mask, normalization)
    with torch.no_grad():
        metrics["policy/clip_frac"] = masked_mean(clipped.to(loss.dtype), mask)
        metrics["policy/num_tokens"] = mask.sum().to(loss.dtype)
    return loss, metrics
