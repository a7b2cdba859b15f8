from __future__ import annotations

import math

import pytest
import torch

from tunelab.losses.ppo import grpo_loss, ppo_policy_loss, ppo_value_loss

F64 = torch.float64


def test_ppo_policy_loss_zero_with_ratio_one_and_zero_advantages() -> None:
    logps = torch.randn(2, 4, dtype=F64, requires_grad=True)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    loss, metrics = ppo_policy_loss(logps, logps.detach(), torch.zeros(2, 4, dtype=F64), mask)
    assert loss.item() == 0.0
    assert metrics["policy/clip_frac"].item() == 0.0
    assert metrics["policy/approx_kl"].item() == 0.0
    assert metrics["policy/ratio_mean"].item() == 1.0


def test_ppo_policy_loss_clipping_hand_worked() -> None:
    # tokens: (ratio 1.5, A=+1) clipped at 1.2; (ratio 0.5, A=-1) clipped at 0.8;
    # (ratio 1.5, A=-1) and (ratio 0.5, A=+1) unclipped; 5th token is padding.
    ratios = [1.5, 0.5, 1.5, 0.5]
    logps = torch.tensor([[math.log(r) for r in ratios] + [float("nan")]], dtype=F64)
    logps.requires_grad_(True)
    old = torch.zeros(1, 5, dtype=F64)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0, 123.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, True, False]])
    loss, metrics = ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2)
    per_token = [-1.0 * 1.2, 1.0 * 0.8, 1.0 * 1.5, -1.0 * 0.5]
    assert loss.item() == pytest.approx(sum(per_token) / 4)
    assert metrics["policy/clip_frac"].item() == pytest.approx(2 / 4)
    assert metrics["policy/ratio_mean"].item() == pytest.approx(sum(ratios) / 4)
    k3 = sum(r - 1 - math.log(r) for r in ratios) / 4
    assert metrics["policy/approx_kl"].item() == pytest.approx(k3)
    loss.backward()
    # d/dlogp of -A * r / 4 is -A * r / 4 on unclipped tokens; 0 on clipped and padding.
    expected_grad = torch.tensor([[0.0, 0.0, 1.0 * 1.5 / 4, -1.0 * 0.5 / 4, 0.0]], dtype=F64)
    torch.testing.assert_close(logps.grad, expected_grad)
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


def test_ppo_value_loss_clipping_hand_worked() -> None:
    values = torch.tensor([[0.5, -0.1, 0.5, 7.0]], dtype=F64, requires_grad=True)
    old = torch.zeros(1, 4, dtype=F64)
    returns = torch.tensor([[1.0, 0.0, 0.0, -5.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    loss, metrics = ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
    # token 0: max((0.5-1)^2, (0.2-1)^2) = 0.64 (clipped); token 1: 0.01 both;
    # token 2: max((0.5-0)^2, (0.2-0)^2) = 0.25 (unclipped).
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.01 + 0.25) / 3)
    assert metrics["value/clip_frac"].item() == pytest.approx(1 / 3)
    loss.backward()
    # d/dv of 0.5 * (v - R)^2 / 3 = (v - R) / 3 on unclipped tokens.
    expected_grad = torch.tensor([[0.0, -0.1 / 3, 0.5 / 3, 0.0]], dtype=F64)
    torch.testing.assert_close(values.grad, expected_grad)
    # R = [1, 0, 0], R - v = [0.5, 0.1, -0.5]; population variances.
    var_r = (1 + 0 + 0) / 3 - (1 / 3) ** 2
    m = 0.1 / 3
    var_res = (0.25 + 0.01 + 0.25) / 3 - m**2
    assert metrics["value/explained_variance"].item() == pytest.approx(1 - var_res / var_r)


def _grpo_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # row 0: 2 real tokens + padded tail; row 1: fully masked; row 2: 3 real tokens.
    mask = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    nan = float("nan")
    logps = torch.tensor([[-1.0, -2.0, nan], [50.0, 50.0, 50.0], [-0.5, -0.5, -0.5]], dtype=F64)
    old = torch.where(mask, logps, torch.full_like(logps, -50.0))
    adv = torch.tensor([1.0, 5.0, -2.0], dtype=F64)
    return logps.requires_grad_(True), old, adv, mask


def test_grpo_loss_token_normalization_counts_only_real_tokens() -> None:
    logps, old, adv, mask = _grpo_batch()
    loss, metrics = grpo_loss(logps, old, adv, mask, normalization="token")
    # ratio 1 everywhere: per-token loss = -A. Sum = 2 * (-1) + 3 * (+2) = 4 over 5 tokens.
    assert loss.item() == pytest.approx((2 * -1.0 + 3 * 2.0) / 5)
    assert metrics["policy/num_tokens"].item() == 5
    assert metrics["policy/clip_frac"].item() == 0.0
    assert "policy/kl" not in metrics
    loss.backward()
    expected_grad = torch.tensor(
        [[-1 / 5, -1 / 5, 0.0], [0.0, 0.0, 0.0], [2 / 5, 2 / 5, 2 / 5]], dtype=F64
    )
    torch.testing.assert_close(logps.grad, expected_grad)


def test_grpo_loss_sequence_normalization_excludes_empty_rows() -> None:
    logps, old, adv, mask = _grpo_batch()
    loss, _ = grpo_loss(logps, old, adv, mask, normalization="sequence")
    # row 0 mean -1, row 2 mean +2, empty row 1 excluded: (-1 + 2) / 2.
    assert loss.item() == pytest.approx((-1.0 + 2.0) / 2)


def test_grpo_loss_kl_term() -> None:
    logps = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    ref = torch.tensor([[math.log(2.0), 0.0]], dtype=F64)
    mask = torch.tensor([[True, True]])
    adv = torch.zeros(1, dtype=F64)
    loss, metrics = grpo_loss(logps, logps.detach(), adv, mask, ref_logps=ref, beta=0.1)
    k3 = (2.0 - math.log(2.0) - 1.0 + 0.0) / 2
    assert metrics["policy/kl"].item() == pytest.approx(k3)
    assert loss.item() == pytest.approx(0.1 * k3)


def test_grpo_loss_clip_frac_and_errors() -> None:
    logps = torch.tensor([[math.log(1.5), math.log(1.1)]], dtype=F64)
    mask = torch.tensor([[True, True]])
    _, metrics = grpo_loss(logps, torch.zeros(1, 2, dtype=F64), torch.ones(1, dtype=F64), mask)
    assert metrics["policy/clip_frac"].item() == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logps, logps, torch.tensor([float("inf")], dtype=F64), mask)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, logps, torch.ones(1, dtype=F64), mask, beta=0.1)
    with pytest.raises(ValueError, match="normalization"):
        grpo_loss(logps, logps, torch.ones(1, dtype=F64), mask, normalization="bogus")


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_grpo_loss_kl_estimator_in_loss_is_the_one_logged(estimator: str) -> None:
    """Issue 14 item 11: the estimator named enters the loss AND is policy/kl (old code: always k3)."""
    logps = torch.tensor([[0.0, -1.0, 7.0]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[math.log(2.0), -0.5, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True, False]])  # the third token is padding (junk values)
    # log r = ref - logp per real token: ln 2 and +0.5
    lr = [math.log(2.0), 0.5]
    hand = {"k1": [-x for x in lr], "k2": [0.5 * x * x for x in lr],
            "k3": [math.exp(x) - x - 1 for x in lr], "abs": [abs(x) for x in lr]}[estimator]
    expected = sum(hand) / 2
    loss, metrics = grpo_loss(logps, logps.detach(), torch.zeros(1, dtype=F64), mask, ref_logps=ref, beta=0.2,
                              kl_estimator=estimator)
    assert metrics["policy/kl"].item() == pytest.approx(expected)
    assert loss.item() == pytest.approx(0.2 * expected)
    with pytest.raises(ValueError, match="kl_estimator"):
        grpo_loss(logps, logps.detach(), torch.zeros(1, dtype=F64), mask, ref_logps=ref, kl_estimator="k4")
