"""Issue 14 item 14: ``eval.sample_questions: n`` asks for exactly min(n, available) side-by-side answers,
and 0 means none, in every recipe that generates them (SFT, DPO family, RL held-out samples)."""

from __future__ import annotations

import pytest
import torch

from tunelab.recipes import dpo, sft
from tunelab.rollout.evaluate import sample_records
from tunelab.rollout.rewards import RewardInputs


def _sft_examples(k: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(k)]


@pytest.mark.parametrize("n", [0, 1, 3, 10])
def test_sft_sample_prompts_count(n: int) -> None:
    prompts = sft._sample_prompts(_sft_examples(5), n)
    assert len(prompts) == min(n, 5)  # old code: n=0 returned all 5 prompts
    assert [p[-1]["content"] for p in prompts] == [f"q{i}" for i in range(min(n, 5))]


@pytest.mark.parametrize("n", [0, 2, 10])
def test_dpo_sample_prompts_count(n: int) -> None:
    examples = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(4)]
    assert len(dpo._sample_prompts(examples, n)) == min(n, 4)


@pytest.mark.parametrize("n", [0, 1, 4])
def test_rl_sample_records_count(n: int) -> None:
    inputs = RewardInputs(prompts=[f"p{i}" for i in range(4)], messages=[[] for _ in range(4)],
                          completions=[f"c{i}" for i in range(4)], num_tokens=[1] * 4, examples=[{}] * 4)
    records = sample_records(inputs, torch.zeros(4), {}, limit=n)
    assert len(records) == n
