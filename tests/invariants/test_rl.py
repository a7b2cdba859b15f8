"""RL invariants: loss denominators count only real completion tokens, end to end through micro-batching;
a non-finite reward never reaches the loss; over-long prompts are dropped and counted."""

import copy
import json

import pytest
import torch

from tunelab.adapters.lora import inject_lora
from tunelab.config.load import validate_config
from tunelab.losses.ppo import grpo_loss
from tunelab.rollout.batch import RolloutBatch, accumulate
from tunelab.rollout.prompts import Prompt, collate_prompts, load_prompts
from tunelab.rollout.scoring import score_completions
from tests.conftest import make_tiny_llama


def _policy():
    model = make_tiny_llama()
    inject_lora(model, "all-linear", r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    return model


def _rollout(mask_truncated=False):
    """6 completions of lengths 1..5 and one truncated (no stop token 2), junk ids in the padding."""
    gen = torch.Generator().manual_seed(0)
    prompts = [Prompt([], torch.randint(3, 97, (n,), generator=gen).tolist(), {}) for n in (2, 5, 3, 4, 6, 3)]
    prompt_ids, prompt_mask = collate_prompts(prompts, 0)
    lengths, width = [1, 3, 5, 2, 4, 5], 6
    ids = torch.randint(3, 97, (6, width), generator=gen)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    truncated = torch.tensor([False, False, False, False, False, True])
    for row, n in enumerate(lengths):
        if not truncated[row]:
            ids[row, n - 1] = 2
    loss_mask = mask & ~truncated[:, None] if mask_truncated else mask
    batch = RolloutBatch(prompt_ids, prompt_mask, ids, mask, loss_mask, truncated)
    batch.extra["advantages"] = torch.tensor([1.0, -0.5, 0.25, 2.0, -1.0, 0.75])
    return batch


def _loss_fn(model, normalization):
    def loss_fn(micro):
        scored = score_completions(model, micro.prompt_ids, micro.prompt_mask, micro.completion_ids,
                                   micro.completion_mask)
        return grpo_loss(scored.logps, scored.logps.detach() + 0.1 * micro.loss_mask, micro.extra["advantages"],
                         micro.loss_mask, normalization=normalization)
    return loss_fn


def _grads(batch, micro_batch_size, normalization):
    model = _policy()
    metrics = accumulate(batch, micro_batch_size, normalization, _loss_fn(model, normalization))
    return metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("normalization", ["token", "sequence"])
def test_micro_batched_grpo_equals_one_pass(normalization):
    full, g_full = _grads(_rollout(), None, normalization)
    for size in (1, 4):
        micro, g = _grads(_rollout(), size, normalization)
        assert abs(micro["loss"] - full["loss"]) < 1e-6
        assert micro["policy/num_tokens"] == full["policy/num_tokens"] == 20
        for name in g_full:
            assert torch.allclose(g[name], g_full[name], atol=1e-6), name


def test_grpo_token_denominator_is_the_number_of_real_completion_tokens():
    """Hand-derived: with ratio exp(-0.1) inside the clip range, per-token loss is -A exp(-0.1); token mean =
    -exp(-0.1) * sum_i A_i n_i / sum_i n_i over real tokens only (n = 1, 3, 5, 2, 4, 5 → 20 tokens)."""
    batch = _rollout()
    metrics = accumulate(batch, 2, "token", _loss_fn(_policy(), "token"))
    adv, n = batch.extra["advantages"], torch.tensor([1, 3, 5, 2, 4, 5.0])
    expected = -torch.exp(torch.tensor(-0.1)) * (adv * n).sum() / n.sum()
    assert abs(metrics["loss"] - float(expected)) < 1e-5
    junk = _rollout()  # different ids at padding positions change nothing
    junk.completion_ids[~junk.completion_mask] = 7
    assert abs(accumulate(junk, 2, "token", _loss_fn(_policy(), "token"))["loss"] - metrics["loss"]) < 1e-6


def test_masked_truncated_completions_leave_numerator_and_denominator():
    batch = _rollout(mask_truncated=True)
    metrics = accumulate(batch, 4, "token", _loss_fn(_policy(), "token"))
    adv, n = batch.extra["advantages"][:5], torch.tensor([1, 3, 5, 2, 4.0])
    assert metrics["policy/num_tokens"] == 15
    assert abs(metrics["loss"] - float(-torch.exp(torch.tensor(-0.1)) * (adv * n).sum() / n.sum())) < 1e-5


def test_non_finite_reward_never_reaches_the_loss(tmp_path, smollm2_tokenizer):
    from tunelab.recipes.grpo import grpo_step
    from tunelab.rollout.rewards import RewardError, RewardTerm
    from tunelab.rollout.session import RLSession
    from tunelab.training.optim import build_optimizer, build_scheduler

    config = validate_config({"task": "grpo", "model": {"name_or_path": "x"}, "data": {"train": {"path": "x"}},
                              "rl": {"num_generations": 2, "max_new_tokens": 4, "rewards": [{"type": "exact_match"}]}})
    model = make_tiny_llama(vocab_size=len(smollm2_tokenizer))
    inject_lora(model, "all-linear", r=4, alpha=8)
    before = copy.deepcopy(model.state_dict())
    calls = []

    def bad(inputs):
        calls.append(1)
        return [float("nan")] + [1.0] * (len(inputs.completions) - 1)

    prompts = [Prompt([{"role": "user", "content": "q"}], [5, 6, 7], {"answer": "1"})]
    session = RLSession(model, smollm2_tokenizer, None, [], 0, 0, [RewardTerm("bad", 1.0, bad)], [2], torch.device("cpu"))
    optimizer = build_optimizer(model, config.train)
    with pytest.raises(RewardError, match="bad returned a non-finite value"):
        grpo_step(session, prompts, config, optimizer, build_scheduler(optimizer, config.train, 1), None,
                  torch.Generator().manual_seed(0))
    assert calls and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_prompts_longer_than_budget_are_dropped_and_counted(tmp_path, smollm2_tokenizer):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "short", "answer": "1"}, {"prompt": "word " * 200, "answer": "2"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "dropped turn"}]},
            {"prompt": "word " * 90}, {"prompt": "short", "answer": "other"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = validate_config({"task": "grpo", "model": {"name_or_path": "x"}, "data": {"train": {"path": str(path)}},
                              "rl": {"rewards": [{"type": "exact_match"}]}})
    result = load_prompts(config.data.train, config.data, smollm2_tokenizer, max_prompt_len=64)
    assert result.num_records == 5 and result.num_too_long == 2 and len(result.prompts) == 2
    assert result.num_duplicates == 1
    assert result.longest_dropped > 200
    assert result.prompts[0].example["answer"] == "1"
    assert result.prompts[1].messages[-1] == {"role": "user", "content": "hi"}  # trailing reply removed
    assert all(n <= 64 for n in result.kept_lengths)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_ppo_kl_that_shapes_the_reward_is_the_kl_logged(estimator, smollm2_tokenizer):
    """Issue 14 item 11: for every rl.kl_estimator the per-token KL logged (extra['kl'], summed into the
    record's `kl`) is the one subtracted from the reward: with gamma = lam = 1, no whitening and a zero
    value head, the return at the first token is score - kl_coef * (logged KL of the row). It is also the
    named estimator of (policy, reference) log-probs. Old code rejected k2 and abs in the config."""
    from tunelab.losses.kl import KL_ESTIMATORS
    from tunelab.models.value_head import ValueHead
    from tunelab.recipes.ppo import make_advantages
    from tunelab.rollout.batch import rollout
    from tunelab.rollout.scoring import reference_logps
    from tunelab.rollout.session import RLSession

    config = validate_config({"task": "ppo", "model": {"name_or_path": "x"}, "data": {"train": {"path": "x"}},
                              "rl": {"num_generations": 2, "max_new_tokens": 5, "kl_estimator": estimator,
                                     "gamma": 1.0, "lam": 1.0, "whiten_advantages": False,
                                     "rewards": [{"type": "exact_match"}]}})
    torch.manual_seed(0)
    model = make_tiny_llama(vocab_size=len(smollm2_tokenizer))
    inject_lora(model, "all-linear", r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # policy != reference (the adapters-off model)
    value_head = ValueHead(model.config.hidden_size)
    for p in value_head.parameters():
        torch.nn.init.zeros_(p)
    session = RLSession(model, smollm2_tokenizer, None, [], 0, 0, [], [2], torch.device("cpu"))
    prompts = [Prompt([{"role": "user", "content": "q"}], [5, 6, 7], {}), Prompt([{"role": "user", "content": "r"}], [9, 4], {})]
    batch, _ = rollout(model, smollm2_tokenizer, prompts, config.rl, num_generations=2, stop_ids=[2],
                       device=torch.device("cpu"))
    scores = torch.tensor([1.0, -0.5, 2.0, 0.25])
    _, extra = make_advantages(session, value_head, batch, scores, config, None, kl_coef=0.3)
    mask = batch.loss_mask
    args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    ref = reference_logps(model, *args)
    expected_kl = torch.where(mask, KL_ESTIMATORS[estimator](extra["old_logps"], ref), torch.zeros(()))
    torch.testing.assert_close(extra["kl"], expected_kl)
    assert float(extra["kl"].abs().sum()) > 1e-4
    torch.testing.assert_close(extra["returns"][:, 0], scores - 0.3 * extra["kl"].sum(dim=1), rtol=1e-5, atol=1e-5)
