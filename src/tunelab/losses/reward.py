"""Pairwise reward-model losses.

Pure functions of scalar reward-head outputs; returns ``(loss, metrics)`` with
``loss`` a scalar (mean over pairs) and ``metrics`` detached scalar batch
means. Inputs are upcast to float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.losses.logprobs import upcast

__all__ = ["bradley_terry_loss"]


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry pairwise ranking loss for reward models.

    Ouyang et al. 2022 (InstructGPT), arXiv:2203.02155, Eq. 1:
    ``L = -log sigma(r(x, y_w) - r(x, y_l))``, averaged over pairs (the paper
    additionally normalises over the K-choose-2 comparisons of a prompt; we
    treat every pair as one row). With ``margin`` this is the Llama 2 variant,
    arXiv:2307.09288, Eq. 2: ``L = -log sigma(r_w - r_l - m)``.

    Args:
        chosen_scores: ``(B,)`` float scalar rewards of the preferred
            responses (reward-model units, i.e. logits of the BT model).
        rejected_scores: ``(B,)`` float rewards of the dispreferred responses.
        margin: optional ``(B,)`` (or broadcastable) float margin ``m >= 0``
            per pair, e.g. larger for more confident human ratings. ``None``
            means 0.

    Returns:
        ``(loss, metrics)``: ``loss`` scalar in nats (mean over the ``B``
        pairs). Metrics: ``reward/accuracy`` (fraction with r_w > r_l),
        ``reward/margin`` (mean r_w - r_l, without ``m``),
        ``reward/chosen`` and ``reward/rejected`` (mean scores).
    """
    if chosen_scores.dim() != 1 or chosen_scores.shape != rejected_scores.shape:
        raise ValueError(
            f"expected equal (B,) scores, got {tuple(chosen_scores.shape)} "
            f"and {tuple(rejected_scores.shape)}"
        )
    chosen = upcast(chosen_scores)
    rejected = upcast(rejected_scores)
    diff = chosen - rejected
    logits = diff if margin is None else diff - upcast(margin)
    loss = -F.logsigmoid(logits).mean()
    diff = diff.detach()
    metrics = {
        "reward/accuracy": (diff > 0).float().mean(),
        "reward/margin": diff.mean(),
        "reward/chosen": chosen.detach().mean(),
        "reward/rejected": rejected.detach().mean(),
    }
    return loss, metrics
