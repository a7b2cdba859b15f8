"""Masked statistics, GAE, PPO token rewards and GRPO group advantages.

Conventions: B sequences, T completion tokens, G group size. ``mask`` is a
``torch.bool`` tensor of shape ``(B, T)``, True where a completion token is
real and counts (False = padding). Rewards, values and advantages are in
reward units; log-probabilities and KL are in nats. Every function here
returns tensors that carry no gradient (advantage estimation is treated as
a constant w.r.t. the policy), except the ``masked_*`` statistics, which are
differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "masked_whiten_with_metrics",
    "masked_sums",
    "whiten_with_sums",
    "std_from_sums",
    "gae",
    "ppo_token_rewards",
    "grpo_advantages",
    "RunningMoments",
]


def _check_mask(mask: torch.Tensor, *like: torch.Tensor) -> None:
    """Raise if ``mask`` is not boolean or does not match the shapes of ``like``."""
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask must be torch.bool (True = real token), got {mask.dtype}; pass mask.bool()"
        )
    for t in like:
        if t.shape != mask.shape:
            raise ValueError(f"shape mismatch: tensor {tuple(t.shape)} vs mask {tuple(mask.shape)}")


def _float(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16/integer tensors to float32; keep float32/float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ValueError naming the first row (dim 0) of ``x`` with a non-finite entry."""
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"{name} has non-finite values at row(s) {rows[:10]} (first: {rows[0]})")


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None = None
) -> torch.Tensor:
    """Mean of ``x`` over entries where ``mask`` is True.

    Args:
        x: any shape, floating.
        mask: bool, same shape as ``x``; True = counts.
        dim: reduce over this dim only; ``None`` reduces everything to a scalar.

    Returns:
        Scalar (``dim=None``) or ``x`` with ``dim`` removed. Where no entry is
        real the result is 0 (not NaN). Values of ``x`` at masked-out
        positions never leak, even if they are inf/NaN (selected with
        ``torch.where``, not multiplied).
    """
    _check_mask(mask, x)
    total = torch.where(mask, x, torch.zeros_like(x)).sum(dim=dim)
    count = mask.sum(dim=dim).clamp(min=1)
    return total / count


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all entries where ``mask`` is True (scalar).

    ``unbiased=True`` uses Bessel's correction ``n / (n - 1)``. Raises
    ValueError if there are no real entries, or only one with ``unbiased``.
    """
    n = int(mask.sum())
    if n == 0 or (unbiased and n == 1):
        raise ValueError(f"masked_var needs >= {2 if unbiased else 1} real entries, got {n}")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return var * (n / (n - 1)) if unbiased else var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalize ``x`` to unit (unbiased) variance over real entries only.

    The tensor half of :func:`masked_whiten_with_metrics` (see there for the rule with fewer
    than two real entries); never raises for a small or empty mask.
    """
    return masked_whiten_with_metrics(x, mask, shift_mean, eps)[0]


def masked_whiten_with_metrics(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Whiten ``x`` over the entries where ``mask`` is True, and say what was done.

    With ``n >= 2`` real entries returns ``(x - mean) / sqrt(var + eps)`` (plus ``mean``
    again if ``shift_mean=False``), mean and unbiased variance taken over the real entries
    only (batch whitening as in the InstructGPT/TRL PPO implementations). With ``n < 2`` the
    variance is undefined, so the values are NOT scaled: the result is ``x - mean`` (``x``
    itself with ``shift_mean=False``), i.e. 0 for a single real entry; nothing raises.
    Padding never leaks into the statistics (even inf/NaN there) and is 0 in the result.

    The statistics come from :func:`masked_sums` (count, sum, sum of squares in float64), so a
    batch split over several processes whitens exactly like one: all-reduce the per-process
    sums and call :func:`whiten_with_sums`, which is what this function does with local sums.

    Args:
        x: any shape, floating (e.g. ``(B, T)`` advantages or rewards, reward units).
        mask: bool, same shape; True = a real entry that counts.
        shift_mean: subtract the mean (True) or keep it (False).
        eps: added to the variance.

    Returns:
        ``(whitened, metrics)``: ``whitened`` has the shape and dtype of ``x``; ``metrics``
        holds detached scalars ``whiten/num_valid`` (real entries), ``whiten/applied`` (1.0
        when scaled, 0.0 when fewer than two real entries left it unscaled), ``whiten/mean``
        and ``whiten/std`` (the statistics used; std 0 when not applied).

    Raises:
        TypeError / ValueError: ``mask`` not bool, or shapes differ.
    """
    return whiten_with_sums(x, mask, masked_sums(x, mask), shift_mean, eps)


def masked_sums(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sufficient statistics of the real entries of ``x``: ``(count, sum, sum of squares)``.

    Args:
        x: any shape, floating; entries where ``mask`` is False never count (even inf/NaN).
        mask: bool, same shape; may be all False (then all three are 0).

    Returns:
        (3,) float64 on ``x``'s device, no grad. Sums of several shards add up to the sums of the
        whole, so processes holding parts of a batch all-reduce (sum) these three numbers.
    """
    _check_mask(mask, x)
    values = torch.where(mask, x.detach().double(), torch.zeros((), dtype=torch.float64, device=x.device))
    return torch.stack([mask.sum().double(), values.sum(), (values * values).sum()])


def _mean_var(sums: torch.Tensor) -> tuple[float, float | None]:
    """Mean and unbiased variance from ``(count, sum, sum of squares)``; variance None below 2 entries."""
    n, total, squares = (float(v) for v in sums)
    mean = total / n if n > 0 else 0.0
    if n < 2:
        return mean, None
    return mean, max(squares - n * mean * mean, 0.0) / (n - 1)


def std_from_sums(sums: torch.Tensor) -> float:
    """Unbiased standard deviation from :func:`masked_sums`-style ``(count, sum, sum of squares)``.

    Raises:
        ValueError: fewer than two entries (the std is undefined).
    """
    _, var = _mean_var(sums)
    if var is None:
        raise ValueError(f"a standard deviation needs >= 2 entries, got {int(float(sums[0]))}")
    return math.sqrt(var)


def whiten_with_sums(
    x: torch.Tensor, mask: torch.Tensor, sums: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`masked_whiten_with_metrics` with the statistics given as ``sums`` = ``(count, sum, sum of
    squares)`` of the whole batch (e.g. all-reduced over processes), not computed from ``x``.

    ``x`` may hold no real entry at all (a process whose rows are all masked): it still whitens
    consistently (its result is all zeros) and reports the global statistics.

    Args:
        x: any shape, floating; mask: bool, same shape; sums: (3,) as from :func:`masked_sums`.

    Returns:
        ``(whitened, metrics)`` as :func:`masked_whiten_with_metrics`.
    """
    _check_mask(mask, x)
    n = int(round(float(sums[0])))
    mean, var = _mean_var(sums)
    zeros = torch.zeros_like(x)
    centered = torch.where(mask, x, zeros) - mean
    if var is not None:
        whitened = centered * (1.0 / math.sqrt(var + eps))
        std = math.sqrt(var)
    else:
        whitened, std = centered, 0.0
    if not shift_mean:
        whitened = whitened + mean
    metrics = {"whiten/num_valid": torch.tensor(float(n)), "whiten/applied": torch.tensor(float(var is not None)),
               "whiten/mean": torch.tensor(mean), "whiten/std": torch.tensor(std)}
    return torch.where(mask, whitened, zeros), metrics


def _check_right_padded(mask: torch.Tensor) -> None:
    """Raise unless each row of ``mask`` is a run of True followed by False."""
    if mask.shape[-1] > 1 and (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError(
            "mask must be right-padded (each row: real tokens, then padding); "
            "found a real token after a padding token"
        )


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, arXiv:1506.02438, Eq. 16).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and
    ``A_t = sum_l (gamma * lam)^l * delta_{t+l}``, computed by the backward
    recursion ``A_t = delta_t + gamma * lam * A_{t+1}``. Each row is one
    episode that terminates after its last real token, so ``V`` and ``A``
    beyond it are 0 (no bootstrapping).

    Args:
        rewards: (B, T) per-token rewards (e.g. from ``ppo_token_rewards``).
        values: (B, T) value estimates V(s_t).
        mask: (B, T) bool, right-padded (rows may have different lengths,
            including zero). Rewards/values at padding are ignored, even NaN.
        gamma: discount factor in [0, 1].
        lam: GAE lambda in [0, 1].

    Returns:
        ``(advantages, returns)``, each (B, T), float32 (float64 if an input
        is float64), no grad, 0 at padding; ``returns = advantages + values``.
        Not whitened: call ``masked_whiten`` on the advantages if wanted.
    """
    _check_mask(mask, rewards, values)
    _check_right_padded(mask)
    dtype = torch.promote_types(_float(rewards).dtype, _float(values).dtype)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    r = torch.where(mask, rewards.to(dtype), zero)
    v = torch.where(mask, values.to(dtype), zero)
    advantages = torch.zeros_like(v)
    next_value = torch.zeros_like(v[:, 0])
    next_adv = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = torch.where(mask[:, t], delta + gamma * lam * next_adv, zero)
        advantages[:, t] = next_adv
        next_value = v[:, t]
    return advantages, torch.where(mask, advantages + v, zero)


@torch.no_grad()
def ppo_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """KL-shaped per-token rewards for PPO-RLHF.

    Implements ``R(x, y) = r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))``
    (Ouyang et al. 2022, arXiv:2203.02155, Eq. 2) spread over tokens as in
    Ziegler et al. 2019 (arXiv:1909.08593): ``-kl_coef * kl[b, t]`` at every
    real token, plus ``scores[b]`` added at the LAST real token of row b.

    Args:
        scores: (B,) sequence-level reward-model scores; must be finite.
        kl: (B, T) per-token KL estimate in nats (e.g. ``kl_k1``).
        mask: (B, T) bool; the last True per row receives the score. Rows
            with no real token get all zeros (their score is dropped).
        kl_coef: beta >= 0 (e.g. ``AdaptiveKLController.value``).

    Returns:
        (B, T) rewards, float32 (float64 if an input is), no grad, 0 at padding.
    """
    _check_mask(mask, kl)
    if scores.shape != mask.shape[:1]:
        raise ValueError(f"scores must have shape ({mask.shape[0]},), got {tuple(scores.shape)}")
    _check_finite(scores, "scores")
    dtype = torch.promote_types(_float(scores).dtype, _float(kl).dtype)
    zero = torch.zeros((), dtype=dtype, device=kl.device)
    rewards = torch.where(mask, -kl_coef * kl.to(dtype), zero)
    length = mask.shape[1]
    # Index of the last True per row: T - 1 - (first True in the reversed row).
    last = length - 1 - mask.flip(dims=[1]).to(torch.int8).argmax(dim=1)
    has_real = mask.any(dim=1)
    rows = torch.arange(mask.shape[0], device=mask.device)[has_real]
    rewards[rows, last[has_real]] += scores.to(dtype)[has_real]
    return rewards


GRPO_REWARD_SCALES = ("group", "batch", "none")


def _group_index(group_ids: torch.Tensor | int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inverse, counts)``: each row's group number 0..K-1 and each group's size (K,)."""
    if isinstance(group_ids, int):
        if group_ids < 2:
            raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {group_ids}")
        if size % group_ids != 0:
            raise ValueError(
                f"batch size B={size} is not divisible by group_size G={group_ids}; with an int group size "
                "rows must be num_groups contiguous groups of G completions (or pass per-row prompt ids)"
            )
        group_ids = torch.arange(size // group_ids).repeat_interleave(group_ids)
    if group_ids.shape != (size,) or group_ids.is_floating_point():
        raise ValueError(f"group_ids must be an integer (B,) = ({size},) tensor, got {group_ids.dtype} "
                         f"{tuple(group_ids.shape)}")
    values, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if (counts < 2).any():
        lonely = values[counts < 2].tolist()
        raise ValueError(f"every prompt needs >= 2 completions (a group of one has no baseline); "
                         f"prompt id(s) {lonely[:10]} have one")
    return inverse, counts


@torch.no_grad()
def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | int | None = None,
    scale_rewards: str | bool = "group",
    eps: float = 1e-4,
    *,
    group_size: int | None = None,
    scale_by_std: bool | None = None,
    batch_std: float | None = None,
) -> torch.Tensor:
    """Group-relative outcome advantages (Shao et al. 2024, arXiv:2402.03300, Sec. 4.1.2).

    ``A_i = (r_i - mean(r_group(i))) / (s + eps)``, the group being every row with the same
    prompt id as row i, wherever those rows sit in the batch. ``s`` by ``scale_rewards``:

    * ``"group"``: the UNBIASED std of the row's own group (Bessel, divisor G - 1), matching
      ``torch.std`` as used by TRL's GRPOTrainer; a group with identical rewards yields zeros.
    * ``"batch"``: the unbiased std of all B rewards of the rollout batch (TRL's
      ``scale_rewards="batch"``; group means are still subtracted per group).
    * ``"none"``: no division, ``A_i = r_i - mean(r_group(i))`` (Dr. GRPO, Liu et al. 2025,
      arXiv:2503.20783).

    Args:
        rewards: (B,) one scalar reward per completion.
        group_ids: (B,) integer prompt id of each row (any order, any values), or an int G
            meaning contiguous groups ``rows [g*G:(g+1)*G]`` (then ``B % G == 0``).
        scale_rewards: ``group`` | ``batch`` | ``none`` (a bool: True = group, False = none).
        eps: added to the std (not the variance).
        group_size, scale_by_std: the older spelling of an int ``group_ids`` and of
            ``scale_rewards`` = group (True) / none (False); used when given.
        batch_std: with ``scale_rewards="batch"``, the std to divide by instead of the std of
            ``rewards``: the unbiased std of the whole rollout when ``rewards`` is one process's share
            of it (:func:`std_from_sums` of the all-reduced :func:`masked_sums`). Groups never span
            processes, so ``group`` and ``none`` need nothing global.

    Returns:
        (B,) advantages in row order, float32 (float64 if ``rewards`` is), no grad.

    Raises:
        ValueError: if ``rewards`` is not 1-D, a group has fewer than 2 rows, an int G does
            not divide B, ``group_ids`` is not an integer (B,) tensor, ``scale_rewards`` is
            unknown, or a reward is non-finite (the message names the row index).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    group_ids = group_size if group_size is not None else group_ids
    if group_ids is None:
        raise ValueError("grpo_advantages needs group_ids (per-row prompt ids) or a group size")
    scale_rewards = scale_by_std if scale_by_std is not None else scale_rewards
    if isinstance(scale_rewards, bool):
        scale_rewards = "group" if scale_rewards else "none"
    if scale_rewards not in GRPO_REWARD_SCALES:
        raise ValueError(f"scale_rewards must be one of {GRPO_REWARD_SCALES}, got {scale_rewards!r}")
    inverse, counts = _group_index(group_ids, rewards.shape[0])
    _check_finite(rewards, "rewards")
    r = _float(rewards)
    inverse, counts = inverse.to(r.device), counts.to(r.device, r.dtype)
    sums = torch.zeros(counts.shape[0], dtype=r.dtype, device=r.device).index_add_(0, inverse, r)
    centered = r - (sums / counts)[inverse]
    if scale_rewards == "group":
        squares = torch.zeros_like(sums).index_add_(0, inverse, centered**2)
        centered = centered / ((squares / (counts - 1)).sqrt()[inverse] + eps)
    elif scale_rewards == "batch":
        centered = centered / ((r.std(correction=1) if batch_std is None else batch_std) + eps)
    return centered


@dataclass
class RunningMoments:
    """Running mean and standard deviation of every reward score seen so far.

    PPO-RLHF works on reward-model scores whose offset and scale are arbitrary (a reward model is
    trained only on score *differences*). Ziegler et al. 2019 (arXiv:1909.08593, Sec. 2.2)
    normalize the reward model so its scores have mean 0 and std 1 on samples of the initial
    policy; this class does the same with statistics over all rollouts so far, starting with the
    first batch (which comes from the initial policy), merged batch by batch with Chan et al.'s
    parallel update (1979). Without it, a value head that starts at 0 and GAE with lambda < 1
    turn a positive score offset into a per-token advantage that is larger for shorter replies
    (the last tokens of every reply get the most of the score), which whitening then turns
    into a push toward short replies whatever the reward model prefers.

    Attributes:
        count: scores seen (int).
        mean: their mean (float, reward units).
        m2: sum of squared deviations from ``mean`` (float).
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @property
    def std(self) -> float:
        """Unbiased sample std of the scores seen (0.0 before two scores)."""
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0

    def update(self, scores: torch.Tensor) -> None:
        """Merge a batch of scores (any shape, finite) into the running statistics.

        Raises:
            ValueError: a score is not finite (its row is named).
        """
        x = scores.detach().double().flatten()
        _check_finite(x, "scores")
        self.update_sums(masked_sums(x, torch.ones_like(x, dtype=torch.bool)))

    def update_sums(self, sums: torch.Tensor) -> None:
        """Merge a batch given by its ``(count, sum, sum of squares)`` (:func:`masked_sums`; e.g. all-reduced
        over the processes that each scored part of the batch, so every process keeps the same moments)."""
        n = int(round(float(sums[0])))
        if n == 0:
            return
        mean = float(sums[1]) / n
        m2 = max(float(sums[2]) - n * mean * mean, 0.0)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    def normalize(self, scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """``(scores - mean) / std`` with the current statistics, same shape and dtype.

        While the std is below ``1e-6`` (e.g. every exact-match reward so far was 0), only the
        mean is subtracted, so a first non-zero reward is not blown up by a tiny std.
        """
        std = self.std
        centered = scores - self.mean
        return centered / (std + eps) if std > 1e-6 else centered
