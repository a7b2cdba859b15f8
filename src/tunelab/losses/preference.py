"""Offline pairwise preference losses (the DPO family).

Every loss takes per-sequence *summed* log-probabilities ``log pi(y | x)``
(``(B,)`` float tensors in nats, one entry per chosen/rejected pair, e.g. from
:func:`tunelab.losses.logprobs.sequence_logps`) and returns
``(loss, metrics)``: ``loss`` is a scalar, the mean over the ``B`` pairs;
``metrics`` holds detached scalar batch means. Inputs are upcast to float32.

Which one to pick
-----------------
* ``dpo`` - the default. Needs a frozen reference model. Use
  ``label_smoothing > 0`` (conservative DPO) when preference labels are noisy.
* ``ipo`` - reference-based, regresses the log-ratio gap to a fixed target
  instead of pushing it to infinity; less prone to overfitting on
  near-deterministic preferences (small data, many epochs).
* ``hinge`` - reference-based SLiC-style hinge; stops pushing once the gap is
  large enough. Cheap and robust, rarely better than DPO.
* ``simpo`` - reference-free and length-normalised: saves the reference
  forward pass and resists length exploitation. Needs token counts; uses much
  larger ``beta`` (2.0) than DPO.
* ``orpo`` - reference-free and single-stage: SFT on the chosen answer plus an
  odds-ratio penalty. Use when starting from a base (non-SFT) model.
* ``kto`` - reference-based and UNPAIRED: each example is one completion
  labelled desirable or undesirable (:func:`kto_loss`); use when feedback is
  thumbs-up/down rather than pairs, or the two classes are imbalanced.

Common metric keys: ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins`` (mean chosen - rejected reward), ``rewards/accuracy``
(fraction of pairs with chosen reward > rejected reward), ``logps/chosen``,
``logps/rejected`` (batch means of the *summed* policy log-probs passed in).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from tunelab.losses.logprobs import log1mexp, upcast

__all__ = [
    "PREFERENCE_LOSSES",
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "kto_loss",
    "orpo_loss",
    "simpo_loss",
]

Metrics = dict[str, torch.Tensor]


def _check_pairs(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Validate that all inputs are ``(B,)`` with equal B; upcast to >= fp32."""
    shape = tensors[0].shape
    for t in tensors:
        if t.dim() != 1 or t.shape != shape:
            shapes = [tuple(x.shape) for x in tensors]
            raise ValueError(f"expected equal (B,) tensors, got {shapes}")
    return [upcast(t) if t.is_floating_point() else t for t in tensors]


def _metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> Metrics:
    """The metric keys shared by every preference loss (detached means)."""
    chosen_rewards = chosen_rewards.detach()
    rejected_rewards = rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def _smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1-eps) log sigma(z) - eps log sigma(-z)`` per pair (eps = 0: plain)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(
        -logits
    )


def _log_ratio_gap(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(h, chosen_log_ratio, rejected_log_ratio)``, each ``(B,)``.

    ``h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]``.
    """
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    return chosen - rejected, chosen, rejected


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Direct Preference Optimization loss.

    Rafailov et al. 2023, arXiv:2305.18290, Eq. 7:
    ``L = -log sigma(beta * h)`` with ``h`` the chosen-minus-rejected
    policy/reference log-ratio gap. With ``label_smoothing = eps > 0`` this is
    conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"),
    in the form TRL uses for ``loss_type="sigmoid"``:
    ``L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` float summed
            policy log-probs (nats) of the chosen / rejected responses.
        ref_chosen_logps, ref_rejected_logps: ``(B,)`` float summed reference
            log-probs (nats); treated as constants (detach them upstream).
        beta: inverse KL-penalty strength (DPO's beta).
        label_smoothing: eps in [0, 0.5), assumed label-flip probability.

    Returns:
        ``(loss, metrics)``; loss is the mean over pairs. Rewards are the
        implicit DPO rewards ``beta * (log pi - log ref)`` per side.
    """
    pc, pr, rc, rr = _check_pairs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    h, chosen_ratio, rejected_ratio = _log_ratio_gap(pc, pr, rc, rr)
    loss = _smoothed_sigmoid_loss(beta * h, label_smoothing).mean()
    return loss, _metrics(beta * chosen_ratio, beta * rejected_ratio, pc, pr)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """Identity Preference Optimization loss.

    Azar et al. 2023, arXiv:2310.12036, Eq. 17: ``L = (h - 1/(2 beta))^2``,
    where ``h`` is the chosen-minus-rejected policy/reference log-ratio gap
    and the paper's tau is our ``beta``. Like the paper, ``h`` is built from
    per-sequence *summed* log-probs; note that TRL's ``loss_type="ipo"``
    instead averages log-probs over tokens, so its ``beta`` is not
    interchangeable with ours. We follow the paper.

    Args/returns as :func:`dpo_loss` (``beta`` is tau; the target gap is
    ``1/(2 beta)``); loss is the mean over pairs.
    """
    pc, pr, rc, rr = _check_pairs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    h, chosen_ratio, rejected_ratio = _log_ratio_gap(pc, pr, rc, rr)
    loss = ((h - 1.0 / (2.0 * beta)) ** 2).mean()
    return loss, _metrics(beta * chosen_ratio, beta * rejected_ratio, pc, pr)


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """SLiC-style hinge loss on the policy/reference log-ratio gap.

    Zhao et al. 2023 (SLiC-HF), arXiv:2305.10425, calibration term of Eq. 1.
    Deliberate simplification, as in the DPO paper and TRL's
    ``loss_type="hinge"``: SLiC-HF's hinge ``max(0, delta - log pi(y_w) +
    log pi(y_l))`` is applied to the reference-normalised gap ``h`` with
    ``delta = 1/beta`` and scaled by ``beta``, i.e. ``L = relu(1 - beta h)``;
    SLiC-HF's separate SFT regulariser is not included.

    Args/returns as :func:`dpo_loss` (the margin in log-ratio units is
    ``1/beta``); loss is the mean over pairs.
    """
    pc, pr, rc, rr = _check_pairs(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    h, chosen_ratio, rejected_ratio = _log_ratio_gap(pc, pr, rc, rr)
    loss = torch.relu(1.0 - beta * h).mean()
    return loss, _metrics(beta * chosen_ratio, beta * rejected_ratio, pc, pr)


def _mean_logps(logps: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """Length-averaged log-prob ``logps / |y|``; ``|y|`` clamped to >= 1."""
    if num_tokens.shape != logps.shape:
        raise ValueError(f"num_tokens {tuple(num_tokens.shape)} vs logps {tuple(logps.shape)}")
    return logps / num_tokens.clamp(min=1).to(logps.dtype)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_num_tokens: torch.Tensor,
    rejected_num_tokens: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """Simple Preference Optimization (reference-free, length-normalised).

    Meng et al. 2024, arXiv:2405.14734, Eq. 6:
    ``L = -log sigma(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)``.
    ``gamma`` is the target reward margin in reward units (the paper's
    gamma, not the ``gamma/beta`` ratio its code exposes; the defaults
    beta=2.0, gamma=1.0 correspond to ratio 0.5). ``label_smoothing`` applies
    the same conservative form as :func:`dpo_loss` (as in the SimPO code).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` float summed
            policy log-probs (nats).
        chosen_num_tokens, rejected_num_tokens: ``(B,)`` int counts of
            response tokens ``|y|`` (the mask sums).
        beta: reward scale. gamma: target margin. label_smoothing: eps.

    Returns:
        ``(loss, metrics)``; loss is the mean over pairs; rewards are
        ``beta * log pi(y) / |y|`` per side.
    """
    pc, pr, nc, nr = _check_pairs(
        policy_chosen_logps, policy_rejected_logps, chosen_num_tokens, rejected_num_tokens
    )
    chosen_rewards = beta * _mean_logps(pc, nc)
    rejected_rewards = beta * _mean_logps(pr, nr)
    logits = chosen_rewards - rejected_rewards - gamma
    loss = _smoothed_sigmoid_loss(logits, label_smoothing).mean()
    return loss, _metrics(chosen_rewards, rejected_rewards, pc, pr)


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_num_tokens: torch.Tensor,
    rejected_num_tokens: torch.Tensor,
    chosen_nll: torch.Tensor,
    lam: float = 0.1,
) -> tuple[torch.Tensor, Metrics]:
    """Odds Ratio Preference Optimization (reference-free, one stage).

    Hong et al. 2024, arXiv:2403.07691, Eqs. 6-7:
    ``L = L_SFT + lam * L_OR`` with
    ``L_OR = -log sigma(log odds(y_w) - log odds(y_l))`` and
    ``log odds(y) = m - log(1 - exp(m))``, ``m = log pi(y) / |y|`` the
    length-averaged log-prob (Eq. 4). ``log(1 - exp(m))`` uses
    :func:`log1mexp`, so the log-odds are exact (no clamp bias) as ``m``
    approaches 0 and their gradient ``1 / (1 - exp(m))`` stays finite; only
    ``m = 0`` exactly (p = 1) is moved to ``-finfo.tiny``.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` float summed
            policy log-probs (nats).
        chosen_num_tokens, rejected_num_tokens: ``(B,)`` int token counts.
        chosen_nll: SFT term ``L_SFT``: the token-averaged NLL (nats) of the
            chosen responses, either ``(B,)`` per pair or a scalar; it is
            averaged to a scalar (pass your own masked mean if you want
            token-weighted averaging over the batch).
        lam: weight lambda of the odds-ratio term (paper default 0.1).

    Returns:
        ``(loss, metrics)``. Rewards are the per-side log-odds
        ``log odds(y)`` (unscaled, so ``rewards/margins`` equals the mean
        log-odds ratio); extra keys ``orpo/log_odds_ratio`` (mean),
        ``orpo/or_loss`` (mean ``L_OR``) and ``orpo/nll`` (mean ``L_SFT``).
    """
    pc, pr, nc, nr = _check_pairs(
        policy_chosen_logps, policy_rejected_logps, chosen_num_tokens, rejected_num_tokens
    )
    chosen_mean = _mean_logps(pc, nc)
    rejected_mean = _mean_logps(pr, nr)
    chosen_log_odds = chosen_mean - log1mexp(chosen_mean)
    rejected_log_odds = rejected_mean - log1mexp(rejected_mean)
    log_odds_ratio = chosen_log_odds - rejected_log_odds
    or_loss = -F.logsigmoid(log_odds_ratio)
    nll = upcast(chosen_nll).mean()
    loss = nll + lam * or_loss.mean()
    metrics = _metrics(chosen_log_odds, rejected_log_odds, pc, pr)
    metrics["orpo/log_odds_ratio"] = log_odds_ratio.detach().mean()
    metrics["orpo/or_loss"] = or_loss.detach().mean()
    metrics["orpo/nll"] = nll.detach()
    return loss, metrics


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    policy_kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    kl_mask: torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """Kahneman-Tversky Optimization on unpaired examples.

    Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 8: with the implied reward
    ``r(x, y) = log pi(y|x) - log ref(y|x)`` and the reference point
    ``z_ref = max(0, mean_j [log pi(y_j'|x_j) - log ref(y_j'|x_j)])``, the
    batch estimate of ``KL(pi || ref)`` from MISMATCHED prompt/completion
    pairs ``(x_j, y_j')`` (``y_j'`` answers another prompt), the value is
    ``v = lambda_D sigma(beta (r - z_ref))`` for a desirable example and
    ``v = lambda_U sigma(beta (z_ref - r))`` for an undesirable one, and the
    loss is ``lambda_y - v`` averaged over the B examples. As in the paper
    (and TRL), ``z_ref`` is not backpropagated through. When no mismatched
    pair is given (``kl_mask`` all False, e.g. a batch of one example, or one
    whose examples all share a prompt) ``z_ref = 0``, the lower end of its
    range, and ``kto/kl_pairs`` is 0.

    Args:
        policy_logps, ref_logps: ``(B,)`` float summed log-probs (nats) of each
            example's completion; the reference is treated as a constant.
        desirable: ``(B,)`` bool, True = desirable (thumbs up).
        policy_kl_logps, ref_kl_logps: ``(B,)`` float summed log-probs (nats)
            of the mismatched sequences.
        kl_mask: ``(B,)`` bool, True where the mismatched sequence is real
            (None = all); False rows are ignored (may hold anything).
        beta: reward scale (paper and TRL default 0.1).
        desirable_weight, undesirable_weight: ``lambda_D``, ``lambda_U`` > 0;
            the paper advises ``lambda_D n_D / (lambda_U n_U)`` in ``[1, 4/3]``.

    Returns:
        ``(loss, metrics)``; loss is the mean over the B examples. Metrics:
        ``rewards/chosen`` / ``rewards/rejected`` (mean ``beta * r`` over the
        desirable / undesirable examples, 0 if none), ``rewards/margins``
        (their difference), ``kto/kl`` (``z_ref``, nats), ``kto/kl_pairs``,
        ``kto/num_desirable``, ``kto/num_undesirable``, ``logps/chosen`` and
        ``logps/rejected`` (mean policy log-probs per class).

    Raises:
        ValueError: shapes differ, ``desirable`` is not bool, or a weight <= 0.
    """
    pl, rl, pkl, rkl = _check_pairs(policy_logps, ref_logps, policy_kl_logps, ref_kl_logps)
    kl_mask = torch.ones_like(desirable, dtype=torch.bool) if kl_mask is None else kl_mask
    for name, mask in (("desirable", desirable), ("kl_mask", kl_mask)):
        if mask.dtype != torch.bool or mask.shape != pl.shape:
            raise ValueError(f"{name} must be a bool {tuple(pl.shape)} tensor, got {mask.dtype} {tuple(mask.shape)}")
    if not (desirable_weight > 0 and undesirable_weight > 0):
        raise ValueError(f"KTO weights must be > 0, got {desirable_weight}, {undesirable_weight}")
    num_kl = kl_mask.sum()
    kl_terms = torch.where(kl_mask, pkl - rkl, torch.zeros_like(pkl))
    z_ref = (kl_terms.sum() / num_kl.clamp(min=1)).clamp(min=0).detach()
    rewards = pl - rl
    weights = torch.where(desirable, torch.full_like(pl, desirable_weight), torch.full_like(pl, undesirable_weight))
    value = torch.where(desirable, torch.sigmoid(beta * (rewards - z_ref)), torch.sigmoid(beta * (z_ref - rewards)))
    loss = (weights * (1.0 - value)).mean()

    def class_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x, torch.zeros_like(x)).sum().detach() / mask.sum().clamp(min=1)

    chosen, rejected = class_mean(beta * rewards, desirable), class_mean(beta * rewards, ~desirable)
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
               "kto/kl": z_ref, "kto/kl_pairs": num_kl.to(pl.dtype),
               "kto/num_desirable": desirable.sum().to(pl.dtype), "kto/num_undesirable": (~desirable).sum().to(pl.dtype),
               "logps/chosen": class_mean(pl, desirable), "logps/rejected": class_mean(pl, ~desirable)}
    return loss, metrics


PreferenceLoss = Callable[..., tuple[torch.Tensor, Metrics]]

PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "kto": kto_loss,
}
