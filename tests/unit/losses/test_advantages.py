from __future__ import annotations

import math

import pytest
import torch

from tunelab.losses.advantages import (
    RunningMoments,
    gae,
    grpo_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    masked_whiten_with_metrics,
    ppo_token_rewards,
)

F64 = torch.float64


def test_masked_mean_var_ignore_padding_even_nan() -> None:
    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 0.0]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 3) / 3)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0], dtype=F64))
    # values 1, 2, 3: mean 2, squared deviations 1, 0, 1.
    assert masked_var(x, mask).item() == pytest.approx(2 / 2)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)
    w = masked_whiten(x, mask)
    torch.testing.assert_close(w, torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=F64))
    w2 = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(w2[mask], torch.tensor([1.0, 2.0, 3.0], dtype=F64))


def test_masked_mean_empty_is_zero_and_rejects_non_bool_mask() -> None:
    x = torch.ones(2, 3)
    assert masked_mean(x, torch.zeros(2, 3, dtype=torch.bool)).item() == 0.0
    with pytest.raises(TypeError):
        masked_mean(x, torch.ones(2, 3))


def test_gae_gamma_lam_one_is_reward_to_go_minus_values() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 99.0]], dtype=F64)
    values = torch.tensor([[0.1, 0.2, 0.3], [1.0, 2.0, 99.0]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    expected_adv = torch.tensor(
        [
            [(1 + 2 + 3) - 0.1, (2 + 3) - 0.2, 3 - 0.3],
            [(0.5 - 1.0) - 1.0, -1.0 - 2.0, 0.0],
        ],
        dtype=F64,
    )
    torch.testing.assert_close(adv, expected_adv)
    expected_ret = torch.tensor([[6.0, 5.0, 3.0], [-0.5, -1.0, 0.0]], dtype=F64)
    torch.testing.assert_close(ret, expected_ret)
    assert not adv.requires_grad


def test_gae_gamma_lam_hand_worked() -> None:
    gamma, lam = 0.9, 0.8
    r = [0.5, -1.0, 2.0]
    v = [1.0, 0.5, -0.5]
    # Padded 4th position with garbage must be ignored.
    rewards = torch.tensor([r + [float("nan")]], dtype=F64)
    values = torch.tensor([v + [1e6]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    d2 = 2.0 - (-0.5)  # terminal: V after last real token is 0
    d1 = -1.0 + 0.9 * (-0.5) - 0.5
    d0 = 0.5 + 0.9 * 0.5 - 1.0
    a2 = d2
    a1 = d1 + 0.9 * 0.8 * a2
    a0 = d0 + 0.9 * 0.8 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]], dtype=F64))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 1.0, a1 + 0.5, a2 - 0.5, 0.0]], dtype=F64))


def test_gae_rejects_non_right_padded_mask() -> None:
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="right-padded"):
        gae(x, x, torch.tensor([[True, False, True]]), 1.0, 1.0)


def test_ppo_token_rewards_score_at_last_real_token() -> None:
    scores = torch.tensor([10.0, -2.0, 7.0], dtype=F64)
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0], [1.0, 1.0, 1.0]], dtype=F64)
    mask = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    out = ppo_token_rewards(scores, kl, mask, kl_coef=0.5)
    expected = torch.tensor(
        [
            [-0.05, -0.1, -0.15 + 10.0],
            [-0.2, -0.25 - 2.0, 0.0],
            [0.0, 0.0, 0.0],  # no real token: score dropped
        ],
        dtype=F64,
    )
    torch.testing.assert_close(out, expected)


def test_grpo_advantages_unbiased_std() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    adv = grpo_advantages(rewards, group_size=4)
    # Group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3).
    a = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))


def test_grpo_advantages_dr_grpo_no_std() -> None:
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_grpo_advantages_errors() -> None:
    with pytest.raises(ValueError, match="divisible"):
        grpo_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match=r"row\(s\) \[2\]"):
        grpo_advantages(torch.tensor([0.0, 1.0, float("nan"), 1.0]), group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.zeros(4), group_size=1)


def test_running_moments_match_the_statistics_of_all_batches_together() -> None:
    m = RunningMoments()
    assert m.std == 0.0
    m.update(torch.tensor([1.0, 2.0, 3.0]))
    m.update(torch.tensor([[4.0], [5.0]]))
    # all five scores 1..5: mean 3, squared deviations 4+1+0+1+4 = 10, unbiased var 10/4.
    assert m.count == 5 and m.mean == pytest.approx(3.0) and m.std == pytest.approx(math.sqrt(2.5))
    out = m.normalize(torch.tensor([5.0, 3.0]))
    torch.testing.assert_close(out, torch.tensor([2 / math.sqrt(2.5), 0.0]))
    with pytest.raises(ValueError, match="non-finite"):
        m.update(torch.tensor([1.0, float("nan")]))


def test_running_moments_only_centre_while_every_score_was_equal() -> None:
    m = RunningMoments()
    m.update(torch.zeros(4))  # e.g. no exact-match hit yet
    torch.testing.assert_close(m.normalize(torch.tensor([0.0, 1.0])), torch.tensor([0.0, 1.0]))


def test_an_uncentred_score_favours_short_replies_and_normalizing_removes_it() -> None:
    """Why PPO normalizes scores: V = 0, lambda < 1, equal scores 3.0 for a 2- and a 5-token reply.

    Without normalization, GAE gives token t the score times lam ** (tokens after t), so the short
    reply's tokens get more of it; after whitening the short reply's tokens are all pushed up and
    the long reply's first tokens down although the reward model liked both equally.
    """
    mask = torch.tensor([[True, True, False, False, False], [True] * 5])
    kl = torch.zeros(2, 5, dtype=F64)
    values = torch.zeros(2, 5, dtype=F64)
    raw = torch.tensor([3.0, 3.0], dtype=F64)
    adv, _ = gae(ppo_token_rewards(raw, kl, mask, 0.1), values, mask, gamma=1.0, lam=0.9)
    # Hand values: short reply [3 * 0.9, 3]; long reply [3 * 0.9**4, 3 * 0.9**3, 3 * 0.9**2, 3 * 0.9, 3].
    torch.testing.assert_close(adv[0, :2], torch.tensor([2.7, 3.0], dtype=F64))
    torch.testing.assert_close(adv[1, 0], torch.tensor(3 * 0.9 ** 4, dtype=F64))
    w = masked_whiten(adv, mask)
    assert masked_mean(w[:1], mask[:1]) > 0 > masked_mean(w[1:], mask[1:])
    m = RunningMoments()
    m.update(raw)
    adv, _ = gae(ppo_token_rewards(m.normalize(raw), kl, mask, 0.1), values, mask, gamma=1.0, lam=0.9)
    assert torch.count_nonzero(adv) == 0


# ------------------------------------------------- issue 14 item 10: masked whitening, < 2 valid values


def test_masked_whiten_uses_valid_tokens_only_and_reports() -> None:
    x = torch.tensor([[2.0, 4.0, 1e9], [6.0, float("nan"), -1e9]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    w, metrics = masked_whiten_with_metrics(x, mask, eps=0.0)
    # valid 2, 4, 6: mean 4, unbiased var (4 + 0 + 4) / 2 = 4, std 2
    torch.testing.assert_close(w, torch.tensor([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=F64))
    assert metrics["whiten/num_valid"].item() == 3 and metrics["whiten/applied"].item() == 1.0
    assert metrics["whiten/mean"].item() == pytest.approx(4.0) and metrics["whiten/std"].item() == pytest.approx(2.0)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_fewer_than_two_valid_is_defined_and_says_so(shift_mean: bool) -> None:
    """One valid value: no variance, so the values are centred (or kept), not scaled; no valid value: zeros.

    Old code raised ValueError from masked_var in both cases (and had no metrics)."""
    x = torch.tensor([[3.5, float("inf")], [-2.0, 7.0]], dtype=F64)
    one = torch.tensor([[True, False], [False, False]])
    w, metrics = masked_whiten_with_metrics(x, one, shift_mean=shift_mean)
    kept = 0.0 if shift_mean else 3.5
    torch.testing.assert_close(w, torch.tensor([[kept, 0.0], [0.0, 0.0]], dtype=F64))
    assert metrics["whiten/num_valid"].item() == 1 and metrics["whiten/applied"].item() == 0.0
    none = torch.zeros(2, 2, dtype=torch.bool)
    w0, metrics0 = masked_whiten_with_metrics(x, none, shift_mean=shift_mean)
    assert torch.equal(w0, torch.zeros_like(x)) and metrics0["whiten/applied"].item() == 0.0
    torch.testing.assert_close(masked_whiten(x, one, shift_mean=shift_mean), w)


# ------------------------------------------------- issue 14 item 12: GRPO scaling and prompt ids


def test_grpo_advantages_batch_scale_hand_value() -> None:
    """scale_rewards='batch': group-centred rewards / std of all B rewards (TRL's scale_rewards='batch')."""
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0], dtype=F64)
    adv = grpo_advantages(rewards, torch.tensor([0, 0, 1, 1]), scale_rewards="batch", eps=0.0)
    # batch mean 7/4; squared deviations 9/16, 49/16, 25/16, 25/16 = 108/16; unbiased var 108/48 = 2.25
    std = 1.5
    torch.testing.assert_close(adv, torch.tensor([0.5 / std, -0.5 / std, 0.0, 0.0], dtype=F64))
    group = grpo_advantages(rewards, torch.tensor([0, 0, 1, 1]), scale_rewards="group", eps=0.0)
    torch.testing.assert_close(group[:2], torch.tensor([1 / math.sqrt(2), -1 / math.sqrt(2)], dtype=F64))
    none = grpo_advantages(rewards, torch.tensor([0, 0, 1, 1]), scale_rewards="none")
    torch.testing.assert_close(none, torch.tensor([0.5, -0.5, 0.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_advantages(rewards, 2, scale_rewards="std")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_follow_prompt_ids_not_row_position(scale: str) -> None:
    """Interleaved rows (prompt ids 7, 3, 7, 3, ...) give each row the advantage it has in the contiguous layout.

    Old code grouped rows [0:G], [G:2G] by position, so interleaving mixed the prompts' rewards."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, generator=gen, dtype=F64)
    contiguous_ids = torch.tensor([7] * 4 + [3] * 4 + [11] * 4)
    reference = grpo_advantages(rewards, contiguous_ids, scale_rewards=scale)
    torch.testing.assert_close(reference, grpo_advantages(rewards, 4, scale_rewards=scale))
    perm = torch.randperm(12, generator=gen)
    shuffled = grpo_advantages(rewards[perm], contiguous_ids[perm], scale_rewards=scale)
    torch.testing.assert_close(shuffled, reference[perm])
    with pytest.raises(ValueError, match=r"prompt id\(s\) \[5\]"):
        grpo_advantages(rewards[:3], torch.tensor([1, 1, 5]))
