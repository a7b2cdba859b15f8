"""Hand-checked tests for tunelab.losses.preference.

Expected values are worked out with ``math`` on concrete numbers; the loss
functions are never used as their own oracle.
"""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.losses.logprobs import log1mexp
from tunelab.losses.preference import (
    PREFERENCE_LOSSES,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)

COMMON_KEYS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracy",
    "logps/chosen",
    "logps/rejected",
}


def softplus(x: float) -> float:
    """-log sigma(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=grad)


def ref_pairs() -> tuple[torch.Tensor, ...]:
    """Two pairs. Pair 0: policy (-10, -12), ref (-11, -11) -> h = 1 - (-1) = 2.
    Pair 1: policy (-5, -4), ref (-5, -5) -> h = 0 - 1 = -1."""
    return t(-10.0, -5.0, grad=True), t(-12.0, -4.0, grad=True), t(-11.0, -5.0), t(-11.0, -5.0)


def assert_metrics(metrics: dict[str, torch.Tensor], extra: set[str] = frozenset()) -> None:
    assert set(metrics) == COMMON_KEYS | set(extra)
    for value in metrics.values():
        assert value.dim() == 0 and not value.requires_grad


# ----------------------------------------------------------------------- DPO


def test_dpo_value_gradient_and_metrics() -> None:
    pc, pr, rc, rr = ref_pairs()
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # beta*h = 0.2 and -0.1; per-pair loss -log sigma(z) = log(1 + e^-z)
    expected = (softplus(-0.2) + softplus(0.1)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # dL/d pc_i = -beta * sigma(-beta h_i) / B ; dL/d pr_i = +beta * sigma(-beta h_i) / B
    g0, g1 = 0.1 * sigmoid(-0.2) / 2, 0.1 * sigmoid(0.1) / 2
    torch.testing.assert_close(pc.grad, t(-g0, -g1))
    torch.testing.assert_close(pr.grad, t(g0, g1))
    assert_metrics(metrics)
    # rewards = 0.1 * (policy - ref): chosen (0.1, 0.0), rejected (-0.1, 0.1)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.05, abs=1e-6)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["rewards/margins"].item() == pytest.approx((0.2 - 0.1) / 2, abs=1e-6)
    assert metrics["rewards/accuracy"].item() == pytest.approx(0.5)
    assert metrics["logps/chosen"].item() == pytest.approx(-7.5)
    assert metrics["logps/rejected"].item() == pytest.approx(-8.0)


def test_dpo_policy_equals_reference_is_ln2_with_zero_rewards() -> None:
    logps_c, logps_r = t(-10.0, -3.0, -7.5, grad=True), t(-12.0, -4.0, -1.0, grad=True)
    loss, metrics = dpo_loss(logps_c, logps_r, logps_c.detach(), logps_r.detach(), beta=0.1)
    assert loss.item() == pytest.approx(0.693147, abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[key].item() == 0.0
    assert metrics["rewards/accuracy"].item() == 0.0  # 0 > 0 is False
    loss.backward()
    # sigma(0) = 1/2 -> dL/d pc = -beta/2/B
    torch.testing.assert_close(logps_c.grad, torch.full((3,), -0.1 / 2 / 3))


def test_dpo_label_smoothing_conservative_form() -> None:
    pc, pr, rc, rr = (x[:1].detach().requires_grad_(x.requires_grad) for x in ref_pairs())
    eps = 0.25
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=eps)
    # z = beta*h = 0.2: -(1-eps) log sigma(z) - eps log sigma(-z)
    expected = 0.75 * softplus(-0.2) + 0.25 * softplus(0.2)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert abs(expected - softplus(-0.2)) > 1e-2  # smoothing really changes the value
    loss.backward()
    # d/dz = -(1-eps) sigma(-z) + eps sigma(z), times dz/dpc = beta
    grad = 0.1 * (-0.75 * sigmoid(-0.2) + 0.25 * sigmoid(0.2))
    assert pc.grad.item() == pytest.approx(grad, abs=1e-7)


def test_dpo_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        dpo_loss(t(1.0, 2.0), t(1.0), t(1.0, 2.0), t(1.0, 2.0))
    with pytest.raises(ValueError):
        dpo_loss(t(1.0), t(1.0), t(1.0), t(1.0), label_smoothing=0.5)


# ----------------------------------------------------------------------- IPO


def test_ipo_value_and_gradient() -> None:
    pc, pr, rc, rr = ref_pairs()
    rc.requires_grad_(True)
    loss, metrics = ipo_loss(pc, pr, rc, rr, beta=0.1)
    # target 1/(2*0.1) = 5; pair 0: (2 - 5)^2 = 9; pair 1: (-1 - 5)^2 = 36
    assert loss.item() == pytest.approx((9 + 36) / 2, abs=1e-5)
    loss.backward()
    # dL/dh_i = 2 (h_i - 5) / B = -3, -6 ; dh/dpc = +1, dh/dpr = -1, dh/drc = -1
    torch.testing.assert_close(pc.grad, t(-3.0, -6.0))
    torch.testing.assert_close(pr.grad, t(3.0, 6.0))
    torch.testing.assert_close(rc.grad, t(3.0, 6.0))
    assert_metrics(metrics)
    assert metrics["rewards/margins"].item() == pytest.approx(0.05, abs=1e-6)


def test_ipo_minimum_at_target_gap() -> None:
    # h = 1/(2*0.5) = 1 exactly -> loss 0
    loss, _ = ipo_loss(t(-1.0), t(-2.0), t(-3.0), t(-3.0), beta=0.5)
    assert loss.item() == 0.0


# --------------------------------------------------------------------- hinge


def test_hinge_value_and_gradient() -> None:
    # pair 0: h = 2 -> relu(1 - 0.2) = 0.8; pair 1: h = (0 - (-20)) = 20 -> relu(1 - 2) = 0
    pc, pr = t(-10.0, -5.0, grad=True), t(-12.0, -25.0, grad=True)
    rc, rr = t(-11.0, -5.0), t(-11.0, -5.0)
    loss, metrics = hinge_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(0.8 / 2, abs=1e-6)
    loss.backward()
    # active pair: d relu(1 - beta h)/d pc = -beta, divided by B = 2; inactive pair: 0
    torch.testing.assert_close(pc.grad, t(-0.05, 0.0))
    torch.testing.assert_close(pr.grad, t(0.05, 0.0))
    assert_metrics(metrics)
    assert metrics["rewards/accuracy"].item() == 1.0


# --------------------------------------------------------------------- SimPO


def test_simpo_value_and_gradient() -> None:
    pc, pr = t(-10.0, grad=True), t(-12.0, grad=True)
    nc, nr = torch.tensor([10]), torch.tensor([8])
    loss, metrics = simpo_loss(pc, pr, nc, nr, beta=2.0, gamma=1.0)
    # rewards: 2 * (-10/10) = -2 ; 2 * (-12/8) = -3 ; z = -2 - (-3) - 1 = 0
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-6)
    loss.backward()
    # dL/dz = -sigma(-0) = -1/2 ; dz/dpc = beta/|y_w| = 0.2 ; dz/dpr = -beta/|y_l| = -0.25
    assert pc.grad.item() == pytest.approx(-0.1, abs=1e-7)
    assert pr.grad.item() == pytest.approx(0.125, abs=1e-7)
    assert_metrics(metrics)
    assert metrics["rewards/chosen"].item() == pytest.approx(-2.0)
    assert metrics["rewards/rejected"].item() == pytest.approx(-3.0)
    assert metrics["rewards/margins"].item() == pytest.approx(1.0)
    assert metrics["logps/chosen"].item() == pytest.approx(-10.0)


def test_simpo_label_smoothing_and_gamma() -> None:
    # rewards: 2 * (-6/4) = -3 ; 2 * (-20/5) = -8 ; z = 5 - gamma(1.5) = 3.5
    args = (t(-6.0), t(-20.0), torch.tensor([4]), torch.tensor([5]))
    loss, _ = simpo_loss(*args, beta=2.0, gamma=1.5, label_smoothing=0.1)
    expected = 0.9 * softplus(-3.5) + 0.1 * softplus(3.5)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------- ORPO


def test_orpo_value_gradient_and_metrics() -> None:
    pc, pr = t(-2.0, grad=True), t(-6.0, grad=True)
    nc, nr = torch.tensor([4]), torch.tensor([3])
    nll = torch.tensor(1.3, requires_grad=True)
    loss, metrics = orpo_loss(pc, pr, nc, nr, nll, lam=0.1)
    # mean logps: m_w = -2/4 = -0.5, m_l = -6/3 = -2
    # log odds(m) = m - log(1 - e^m)
    lo_w = -0.5 - math.log(1 - math.exp(-0.5))  # = 0.4327...
    lo_l = -2.0 - math.log(1 - math.exp(-2.0))  # = -1.8546...
    ratio = lo_w - lo_l
    l_or = softplus(-ratio)  # -log sigma(ratio)
    assert loss.item() == pytest.approx(1.3 + 0.1 * l_or, abs=1e-6)
    loss.backward()
    # d lo/dm = 1 + e^m / (1 - e^m) = 1 / (1 - e^m); dm/dpc = 1/|y|
    dlo_w = 1 / (1 - math.exp(-0.5))
    dlo_l = 1 / (1 - math.exp(-2.0))
    assert pc.grad.item() == pytest.approx(0.1 * -sigmoid(-ratio) * dlo_w / 4, rel=1e-5)
    assert pr.grad.item() == pytest.approx(0.1 * sigmoid(-ratio) * dlo_l / 3, rel=1e-5)
    assert nll.grad.item() == pytest.approx(1.0)
    assert_metrics(metrics, {"orpo/log_odds_ratio", "orpo/or_loss", "orpo/nll"})
    assert metrics["orpo/log_odds_ratio"].item() == pytest.approx(ratio, rel=1e-5)
    assert metrics["orpo/or_loss"].item() == pytest.approx(l_or, rel=1e-5)
    assert metrics["orpo/nll"].item() == pytest.approx(1.3)
    assert metrics["rewards/chosen"].item() == pytest.approx(lo_w, rel=1e-5)
    assert metrics["rewards/rejected"].item() == pytest.approx(lo_l, rel=1e-5)
    assert metrics["rewards/accuracy"].item() == 1.0


def test_orpo_log1mexp_stable_near_zero() -> None:
    # mean logp m = -1e-6 (float32): log(1 - e^m) = log(1e-6 - 5e-13 + ...) ~ -13.815511
    # so log odds = m - log(1 - e^m) ~ 13.815510. Naive float32 log1p(-exp(m)) is off
    # by ~3% inside the log (exp(-1e-6) rounds to 1 - 1.013e-6), which this catches.
    pc = t(-1e-6, grad=True)
    loss, metrics = orpo_loss(pc, t(-3.0), torch.tensor([1]), torch.tensor([1]), t(0.0), lam=1.0)
    lo_w = -1e-6 - math.log(-math.expm1(-1e-6))
    lo_l = -3.0 - math.log1p(-math.exp(-3.0))
    assert metrics["rewards/chosen"].item() == pytest.approx(lo_w, rel=1e-6)
    assert metrics["orpo/log_odds_ratio"].item() == pytest.approx(lo_w - lo_l, rel=1e-6)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pc.grad).all()
    # probability exactly 1 (m = 0) stays finite too
    loss0, _ = orpo_loss(t(0.0), t(-3.0), torch.tensor([1]), torch.tensor([1]), t(0.0))
    assert torch.isfinite(loss0)


def test_log1mexp_both_branches() -> None:
    x = torch.tensor([-1e-6, -0.1, -0.7, -2.0, -50.0], dtype=torch.float64)
    expected = [math.log(-math.expm1(v)) for v in x.tolist()]
    torch.testing.assert_close(log1mexp(x), torch.tensor(expected, dtype=torch.float64))


# ---------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert PREFERENCE_LOSSES == {
        "dpo": dpo_loss,
        "ipo": ipo_loss,
        "hinge": hinge_loss,
        "simpo": simpo_loss,
        "orpo": orpo_loss,
        "kto": kto_loss,
    }


# ------------------------------------------------- issue 14 item 9: ORPO near p = 1


@pytest.mark.parametrize("m", [-1e-3, -1e-6, -1e-7, -1e-9, -1e-15, -1e-30])
def test_orpo_log_odds_exact_near_probability_one(m: float) -> None:
    """float32 log-odds (and their gradient) match float64 maths at the same input, as m -> 0.

    Old code clamped m to -eps (1.19e-7 in float32), so m = -1e-9 gave log odds 15.9 instead of 20.7.
    """
    m32 = torch.tensor([m], dtype=torch.float32)
    mf = float(m32)  # the float32 value, evaluated in float64 by hand: log odds = m - log(-expm1(m))
    expected = mf - math.log(-math.expm1(mf))
    pc = m32.clone().requires_grad_(True)
    loss, metrics = orpo_loss(pc, t(-3.0), torch.tensor([1]), torch.tensor([1]), t(0.0), lam=1.0)
    assert metrics["rewards/chosen"].item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d L / d m_w = -sigmoid(-z) * d lo_w / d m_w, with d lo / d m = 1 / (1 - e^m) = -1 / expm1(m)
    lo_l = -3.0 - math.log1p(-math.exp(-3.0))
    z = expected - lo_l
    grad = -(1.0 / (1.0 + math.exp(z))) * (-1.0 / math.expm1(mf))
    assert torch.isfinite(pc.grad).all()
    assert pc.grad.item() == pytest.approx(grad, rel=1e-4, abs=1e-30)


def test_orpo_gradients_finite_at_probability_one_on_either_side() -> None:
    """m = 0 exactly (p = 1) and m = -tiny on the chosen or the rejected side: finite loss and gradients."""
    for value in (0.0, -torch.finfo(torch.float32).tiny, -1e-30):
        for side in ("chosen", "rejected"):
            a, b = t(value, grad=True), t(-2.0, grad=True)
            pc, pr = (a, b) if side == "chosen" else (b, a)
            loss, _ = orpo_loss(pc, pr, torch.tensor([3]), torch.tensor([3]), t(0.5), lam=0.1)
            loss.backward()
            assert torch.isfinite(loss), (value, side)
            assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all(), (value, side)


def test_log1mexp_float32_matches_float64_near_zero() -> None:
    x = torch.tensor([-1e-30, -1e-12, -1e-8, -1e-7, -0.5, -0.7, -5.0], dtype=torch.float32)
    expected = torch.tensor([math.log(-math.expm1(v)) for v in x.double().tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x).double(), expected, rtol=1e-6, atol=0)
    assert torch.isfinite(log1mexp(torch.zeros(1)))  # p = 1 exactly: finite (-finfo.tiny)


# ------------------------------------------------- issue 14 item 13: KTO


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_kto_value_gradient_and_metrics() -> None:
    from tunelab.losses.preference import kto_loss

    pl = t(-2.0, -3.0, -1.0, grad=True)
    rl = t(-2.5, -2.0, -1.0)
    desirable = torch.tensor([True, False, True])
    pkl = t(-4.0, -6.0, 0.0, grad=True)
    rkl = t(-5.0, -6.5, 9.0)
    kl_mask = torch.tensor([True, True, False])  # row 2 has no mismatched partner: its junk KL is ignored
    loss, metrics = kto_loss(pl, rl, desirable, pkl, rkl, kl_mask, beta=0.5, desirable_weight=1.0,
                             undesirable_weight=2.0)
    # z_ref = max(0, mean(1.0, 0.5)) = 0.75; rewards r = 0.5, -1, 0
    z = 0.75
    s0, s1, s2 = _sig(0.5 * (0.5 - z)), _sig(0.5 * (z + 1.0)), _sig(0.5 * (0.0 - z))
    expected = ((1 - s0) + 2.0 * (1 - s1) + (1 - s2)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # dL/dp_0 = -(1/3) beta s0 (1 - s0); undesirable: dL/dp_1 = +(2/3) beta s1 (1 - s1)
    assert pl.grad[0].item() == pytest.approx(-(1 / 3) * 0.5 * s0 * (1 - s0), rel=1e-5)
    assert pl.grad[1].item() == pytest.approx((2 / 3) * 0.5 * s1 * (1 - s1), rel=1e-5)
    assert pkl.grad is None or torch.count_nonzero(pkl.grad) == 0  # z_ref is a constant
    assert metrics["kto/kl"].item() == pytest.approx(z)
    assert metrics["kto/kl_pairs"].item() == 2
    assert metrics["rewards/chosen"].item() == pytest.approx(0.5 * (0.5 + 0.0) / 2)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.5 * -1.0)
    assert metrics["rewards/margins"].item() == pytest.approx(0.125 + 0.5)
    assert metrics["kto/num_desirable"].item() == 2 and metrics["kto/num_undesirable"].item() == 1


def test_kto_reference_point_clamped_at_zero_and_without_pairs() -> None:
    from tunelab.losses.preference import kto_loss

    # policy == reference: r = 0; a negative KL estimate clamps to 0, so every loss is 1 - sigma(0) = 0.5
    loss, metrics = kto_loss(t(-1.0, -2.0), t(-1.0, -2.0), torch.tensor([True, False]), t(-3.0, -3.0), t(-1.0, -1.0))
    assert loss.item() == pytest.approx(0.5) and metrics["kto/kl"].item() == 0.0
    # batch of one: no mismatched pair -> z_ref = 0 and kto/kl_pairs = 0 (defined, finite)
    loss1, metrics1 = kto_loss(t(-1.0), t(-2.0), torch.tensor([True]), t(-1.0), t(-2.0), torch.tensor([False]),
                               beta=0.1)
    assert loss1.item() == pytest.approx(1 - _sig(0.1 * 1.0)) and metrics1["kto/kl_pairs"].item() == 0
    with pytest.raises(ValueError, match="desirable"):
        kto_loss(t(-1.0), t(-2.0), torch.tensor([1]), t(-1.0), t(-2.0))
    with pytest.raises(ValueError, match="weights"):
        kto_loss(t(-1.0), t(-2.0), torch.tensor([True]), t(-1.0), t(-2.0), undesirable_weight=0.0)
