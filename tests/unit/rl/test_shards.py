"""Issue 19 (PPO/GRPO on several processes), the pieces that make N ranks equal one process, on one process:
per-row seeded sampling, shard sums for whitening / score normalization / GRPO batch std, mini-batch shares.
Each fails on the old code (the functions or arguments did not exist: one process sampled from the
global RNG and whitened from its own rows only)."""

import math

import pytest
import torch

from tests.conftest import make_tiny_llama
from tunelab.losses.advantages import (
    RunningMoments, grpo_advantages, masked_sums, masked_whiten_with_metrics, std_from_sums, whiten_with_sums,
)
from tunelab.rollout.generate import sample_completions
from tunelab.rollout.prompts import Prompt, collate_prompts
from tunelab.rollout.shards import mini_batch_shares, rank_prompts, row_seeds

F64 = torch.float64


def test_whitening_each_shard_with_the_summed_statistics_equals_whitening_the_whole_batch():
    # Shard 0: real values 2, 4 (and junk at padding); shard 1: real 6; shard 2: no real token at all.
    x = [torch.tensor([[2.0, 4.0, 1e9]], dtype=F64), torch.tensor([[6.0, float("nan"), 0.0]], dtype=F64),
         torch.tensor([[float("inf"), 3.0, 3.0]], dtype=F64)]
    mask = [torch.tensor([[True, True, False]]), torch.tensor([[True, False, False]]), torch.zeros(1, 3, dtype=torch.bool)]
    sums = sum(masked_sums(a, m) for a, m in zip(x, mask))
    assert sums.tolist() == [3.0, 12.0, 56.0]  # count, 2 + 4 + 6, 4 + 16 + 36
    # by hand: mean 4, unbiased var (4 + 0 + 4) / 2 = 4, std 2 -> (2, 4, 6) whiten to (-1, 0, 1)
    parts = [whiten_with_sums(a, m, sums, eps=0.0) for a, m in zip(x, mask)]
    assert parts[0][0].tolist() == [[-1.0, 0.0, 0.0]] and parts[1][0].tolist() == [[1.0, 0.0, 0.0]]
    assert parts[2][0].tolist() == [[0.0, 0.0, 0.0]]  # the rank with no valid token joins and gets zeros
    for _, metrics in parts:  # every shard reports the global statistics
        assert metrics["whiten/num_valid"].item() == 3 and metrics["whiten/std"].item() == pytest.approx(2.0)
    whole, metrics = masked_whiten_with_metrics(torch.cat(x), torch.cat(mask), eps=0.0)
    torch.testing.assert_close(whole, torch.cat([p[0] for p in parts]))
    assert metrics["whiten/mean"].item() == pytest.approx(4.0)


def test_fewer_than_two_valid_values_over_all_shards_stay_unscaled():
    x, mask = torch.tensor([[5.0, 1.0]]), torch.tensor([[True, False]])
    sums = masked_sums(x, mask) + masked_sums(x, torch.zeros_like(mask))
    out, metrics = whiten_with_sums(x, mask, sums)
    assert out.tolist() == [[0.0, 0.0]] and metrics["whiten/applied"].item() == 0.0
    with pytest.raises(ValueError, match="needs >= 2 entries"):
        std_from_sums(sums)


def test_running_moments_from_shard_sums_equal_one_update_of_all_scores():
    shards = [torch.tensor([1.0, 2.0]), torch.tensor([3.0]), torch.tensor([])]
    merged = RunningMoments()
    merged.update_sums(sum(masked_sums(s, torch.ones_like(s, dtype=torch.bool)) for s in shards))
    merged.update_sums(masked_sums(torch.tensor([4.0, 5.0]), torch.ones(2, dtype=torch.bool)))
    # all five scores 1..5: mean 3, unbiased var 10 / 4
    assert merged.count == 5 and merged.mean == pytest.approx(3.0) and merged.std == pytest.approx(math.sqrt(2.5))


def test_grpo_batch_scale_uses_the_std_of_the_whole_rollout_when_given():
    rewards = torch.tensor([1.0, 0.0, 3.0, 3.0])  # this rank's two groups of 2
    everyone = torch.tensor([1.0, 0.0, 3.0, 3.0, 10.0, 12.0, 5.0, 7.0])  # with the other rank's rows
    std = std_from_sums(masked_sums(everyone, torch.ones(8, dtype=torch.bool)))
    assert std == pytest.approx(float(everyone.std()))
    adv = grpo_advantages(rewards, torch.tensor([0, 0, 1, 1]), scale_rewards="batch", eps=0.0, batch_std=std)
    # group-centred: (0.5, -0.5, 0, 0), divided by the std of all 8 rewards, not of these 4
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.0]) / std)
    alone = grpo_advantages(rewards, torch.tensor([0, 0, 1, 1]), scale_rewards="batch", eps=0.0)
    assert not torch.allclose(adv, alone)


@pytest.mark.parametrize("mini,micro", [(None, None), (2, None), (2, 1), (3, 2)])
def test_mini_batch_shares_of_two_ranks_are_the_one_process_mini_batches(mini, micro):
    rows = 6  # per rank; one process holds 12 rows with mini-batches twice as large
    one = mini_batch_shares(2 * rows, None if mini is None else 2 * mini, micro, torch.Generator().manual_seed(3), 0, 1)
    ranks = [mini_batch_shares(rows, mini, micro, torch.Generator().manual_seed(3), r, 2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for k, whole in enumerate(one):
        mine = [ranks[r][k].rows + r * rows for r in (0, 1)]
        assert sorted(torch.cat(mine).tolist()) == sorted(whole.rows.tolist())
        assert ranks[0][k].num_micro_batches == ranks[1][k].num_micro_batches  # collectives line up
        need = max(math.ceil(len(ranks[r][k].rows) / micro) if micro else 1 for r in (0, 1))
        assert ranks[0][k].num_micro_batches == max(1, need)


def test_rank_prompts_are_contiguous_shares_and_seeds_name_global_rows():
    prompts = list("abcdef")
    assert [rank_prompts(prompts, r, 3) for r in range(3)] == [["a", "b"], ["c", "d"], ["e", "f"]]
    with pytest.raises(ValueError, match="do not split"):
        rank_prompts(prompts, 0, 4)
    assert row_seeds(7, 3, 4, 4) == row_seeds(7, 3, 0, 8)[4:]
    assert len(set(row_seeds(7, 3, 0, 8) + row_seeds(7, 4, 0, 8) + row_seeds(8, 3, 0, 8))) == 24


def test_a_seeded_row_samples_the_same_completion_alone_or_in_any_batch():
    """What a row samples depends on its seed only, so rank r of N samples what one process would."""
    model = make_tiny_llama()
    gen = torch.Generator().manual_seed(0)
    prompts = [Prompt([], torch.randint(3, 97, (n,), generator=gen).tolist(), {}) for n in (4, 7, 2)]
    seeds = row_seeds(0, 0, 0, 3)
    ids, mask = collate_prompts(prompts, pad_id=0)
    batch = sample_completions(model, ids, mask, max_new_tokens=8, stop_ids=[2], pad_id=0, row_seeds=seeds)
    for row in range(3):
        one_ids, one_mask = collate_prompts(prompts[row:row + 1], pad_id=0)
        alone = sample_completions(model, one_ids, one_mask, max_new_tokens=8, stop_ids=[2], pad_id=0,
                                   row_seeds=seeds[row:row + 1])
        n = int(alone.completion_mask.sum())
        assert batch.completion_ids[row, :n].tolist() == alone.completion_ids[0, :n].tolist()
    other = sample_completions(model, ids, mask, max_new_tokens=8, stop_ids=[2], pad_id=0,
                               row_seeds=row_seeds(1, 0, 0, 3))
    assert other.completion_ids.tolist() != batch.completion_ids.tolist()  # the seed matters
