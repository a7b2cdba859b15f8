"""Hand-checked tests for tunelab.losses.reward."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.losses.reward import bradley_terry_loss


def softplus(x: float) -> float:
    """-log sigma(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_bradley_terry_value_gradient_and_metrics() -> None:
    chosen = torch.tensor([2.0, 0.5], requires_grad=True)
    rejected = torch.tensor([1.0, 2.5], requires_grad=True)
    loss, metrics = bradley_terry_loss(chosen, rejected)
    # r_c - r_r = (1, -2); -log sigma(d) = log(1 + e^-d)
    assert loss.item() == pytest.approx((softplus(-1.0) + softplus(2.0)) / 2, abs=1e-6)
    loss.backward()
    # dL/dr_c = -sigma(-d) / B ; dL/dr_r = +sigma(-d) / B
    g = [sigmoid(-1.0) / 2, sigmoid(2.0) / 2]
    torch.testing.assert_close(chosen.grad, torch.tensor([-g[0], -g[1]]))
    torch.testing.assert_close(rejected.grad, torch.tensor(g))
    assert set(metrics) == {"reward/accuracy", "reward/margin", "reward/chosen", "reward/rejected"}
    assert metrics["reward/accuracy"].item() == pytest.approx(0.5)
    assert metrics["reward/margin"].item() == pytest.approx(-0.5)  # (1 + -2) / 2
    assert metrics["reward/chosen"].item() == pytest.approx(1.25)
    assert metrics["reward/rejected"].item() == pytest.approx(1.75)
    for value in metrics.values():
        assert value.dim() == 0 and not value.requires_grad


def test_bradley_terry_with_llama2_margin() -> None:
    chosen = torch.tensor([2.0, 0.5], requires_grad=True)
    rejected = torch.tensor([1.0, 2.5])
    margin = torch.tensor([0.5, 0.0])
    loss, metrics = bradley_terry_loss(chosen, rejected, margin=margin)
    # logits d - m = (1 - 0.5, -2 - 0) = (0.5, -2)
    assert loss.item() == pytest.approx((softplus(-0.5) + softplus(2.0)) / 2, abs=1e-6)
    loss.backward()
    torch.testing.assert_close(
        chosen.grad, torch.tensor([-sigmoid(-0.5) / 2, -sigmoid(2.0) / 2])
    )
    # the reported margin is r_c - r_r, not shifted by m
    assert metrics["reward/margin"].item() == pytest.approx(-0.5)


def test_bradley_terry_equal_scores_is_ln2_and_bf16_upcast() -> None:
    scores = torch.tensor([0.25, -3.0, 7.0], dtype=torch.bfloat16)
    loss, metrics = bradley_terry_loss(scores, scores.clone())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)
    assert metrics["reward/accuracy"].item() == 0.0


def test_bradley_terry_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))
