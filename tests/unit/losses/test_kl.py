from __future__ import annotations

import math

import pytest
import torch

from tunelab.losses.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_k1,
    kl_k2,
    kl_k3,
)


def test_k1_k2_k3_hand_values() -> None:
    logps = torch.tensor([[0.0, math.log(2.0), -1.0]], dtype=torch.float64)
    ref = torch.tensor([[math.log(2.0), 0.0, -1.0]], dtype=torch.float64)
    # token 0: log r = ref - logp = log 2; token 1: log r = -log 2; token 2: equal.
    l2 = math.log(2.0)
    expected_k1 = torch.tensor([[-l2, l2, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(kl_k1(logps, ref), expected_k1)
    torch.testing.assert_close(
        kl_k2(logps, ref), torch.tensor([[0.5 * l2**2, 0.5 * l2**2, 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        kl_k3(logps, ref),
        torch.tensor([[2.0 - l2 - 1.0, 0.5 + l2 - 1.0, 0.0]], dtype=torch.float64),
    )


def test_k3_nonnegative_and_registry() -> None:
    g = torch.Generator().manual_seed(0)
    logps, ref = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    assert (kl_k3(logps, ref) >= 0).all()
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3", "abs"}
    assert KL_ESTIMATORS["k3"] is kl_k3


def test_adaptive_controller_worked_by_hand() -> None:
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 9 -> error 9/6 - 1 = 0.5, clipped to +0.2; gain 256 / 10000.
    ctl.update(current_kl=9.0, n_steps=256)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    # KL 5.4 -> error -0.1 (inside the clip range).
    before = ctl.value
    ctl.update(current_kl=5.4, n_steps=256)
    assert ctl.value == pytest.approx(before * (1 - 0.1 * 256 / 10000))
    # KL 0 -> error -1, clipped to -0.2.
    before = ctl.value
    ctl.update(current_kl=0.0, n_steps=1000)
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 1000 / 10000))


def test_adaptive_controller_rejects_nan_and_bad_target() -> None:
    ctl = AdaptiveKLController(0.1, 6.0, 10000)
    with pytest.raises(ValueError):
        ctl.update(float("nan"), 10)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 0.0, 10000)


def test_fixed_controller() -> None:
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.05


def test_abs_estimator_hand_value() -> None:
    """Issue 14 item 11: 'abs' is |log p - log ref| (new; absent before)."""
    from tunelab.losses.kl import kl_abs

    logps = torch.tensor([[-1.0, -3.0, 0.5]], dtype=torch.float64)
    ref = torch.tensor([[-2.5, -1.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(kl_abs(logps, ref), torch.tensor([[1.5, 2.0, 0.0]], dtype=torch.float64))
    assert KL_ESTIMATORS["abs"] is kl_abs
