"""Per-token KL estimators and KL-coefficient controllers for RLHF.

Estimators
----------
All three take per-token log-probabilities of the *sampled* completion tokens
under the policy (``logps``) and under a reference model (``ref_logps``), both
of shape ``(B, T)`` (B sequences, T completion tokens), floating dtype, in nats.
Tokens are assumed sampled from the policy, so each estimates
``KL(policy || ref)`` per token, following J. Schulman, "Approximating KL
Divergence" (2020, http://joschu.net/blog/kl-approx.html), with
``r = ref(x) / policy(x)`` and ``log r = ref_logps - logps``:

* ``k1 = -log r``               unbiased, high variance, can be negative;
* ``k2 = 0.5 * (log r) ** 2``   biased, low variance, always >= 0;
* ``k3 = (r - 1) - log r``      unbiased, low variance, always >= 0;
* ``abs = |log r|``               biased, always >= 0 (an L1 penalty on the log-ratio,
  one of the penalties TRL's PPO trainer offers as ``kl_penalty="abs"``).

``KL_ESTIMATORS`` maps the config names (``rl.kl_estimator``) to these functions; the
recipes use the chosen one both to shape the reward / loss and for the logged ``kl``.

They are element-wise and do **no** masking or reduction: the returned
``(B, T)`` tensor has the same dtype as the inputs, and values at padding
positions are whatever the inputs there produce. Callers must mask (boolean
``mask`` True where a completion token is real) before reducing.
Simplification: ``k3`` is not clamped; a huge ``ref_logps - logps`` overflows
``exp`` to ``inf`` (some implementations clamp to e.g. [-10, 10]).

Controllers
-----------
``AdaptiveKLController`` is the proportional controller of Ziegler et al. 2019,
"Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593,
Sec. 2.2; ``FixedKLController`` keeps the coefficient constant.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = [
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_abs",
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
]


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k1 estimator ``logps - ref_logps`` (nats), element-wise, shape as inputs.

    Unbiased for ``KL(policy || ref)`` when tokens are sampled from the policy;
    individual values may be negative. No masking, no reduction.
    """
    return logps - ref_logps


def kl_k2(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k2 estimator ``0.5 * (logps - ref_logps) ** 2`` (nats), element-wise.

    Biased (low bias when the policies are close), non-negative.
    No masking, no reduction.
    """
    return 0.5 * (logps - ref_logps) ** 2


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` (nats), element-wise.

    Unbiased for ``KL(policy || ref)`` under policy samples, non-negative; this
    is the per-token KL of GRPO (Shao et al. 2024, arXiv:2402.03300, Eq. 4).
    No masking, no reduction, no clamping.
    """
    log_r = ref_logps - logps
    return torch.exp(log_r) - log_r - 1.0


def kl_abs(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """abs estimator ``|logps - ref_logps|`` (nats), element-wise, shape as inputs.

    Biased (it upper-bounds ``|k1|``), non-negative. No masking, no reduction.
    """
    return (logps - ref_logps).abs()


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "abs": kl_abs,
}


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, arXiv:1909.08593, Sec. 2.2).

    The paper's update is ``e_t = clip((KL_t - KL_target) / KL_target, -0.2, 0.2)``
    and ``beta_{t+1} = beta_t * (1 + K_beta * e_t)``. As in the authors' code
    (openai/lm-human-preferences) the gain is ``K_beta = n_steps / horizon``,
    where ``n_steps`` is the number of samples (episodes) the KL was measured
    on since the last update, so the coefficient's time constant is ``horizon``
    samples.

    Args:
        init_kl_coef: initial beta (>= 0).
        target: target KL in nats (> 0), the same per-sequence or per-token
            quantity the caller passes as ``current_kl``.
        horizon: horizon in samples (> 0).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if not target > 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Update ``self.value`` from the KL (nats) measured over ``n_steps`` samples."""
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class FixedKLController:
    """Constant KL coefficient; ``update`` is a no-op (same interface as adaptive)."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Do nothing: the coefficient is fixed."""
        return None
