"""GRPO and PPO recipes end to end on a tiny Llama with the real SmolLM2 tokenizer (a few RL steps)."""

import json

import pytest
import torch

from tunelab.config.load import validate_config
from tests.conftest import make_tiny_llama


@pytest.fixture
def tiny_model_dir(tmp_path, smollm2_tokenizer):
    model = make_tiny_llama(vocab_size=len(smollm2_tokenizer))
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return str(path)


def _config(tmp_path, model_dir, task, rewards, **rl):
    return validate_config({
        "task": task, "output_dir": str(tmp_path / task), "model": {"name_or_path": model_dir},
        "data": {"train": {"path": "builtin:arithmetic", "name": "add", "split": "train"},
                 "validation": {"path": "builtin:arithmetic", "name": "add", "split": "validation"},
                 "max_examples": 40},
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "threads": 1},
        "eval": {"batch_size": 4},
        "rl": {"num_generations": 2, "max_new_tokens": 6, "max_prompt_len": 128, "rewards": rewards,
               "eval_prompts": 4, "log_samples_every": 1, **rl},
    })


def test_grpo_recipe_runs_and_writes_run(tmp_path, tiny_model_dir):
    from tunelab.recipes.grpo import train

    rewards = [{"type": "exact_match"}, {"type": "length_penalty", "max_tokens": 2, "weight": 0.5}]
    config = _config(tmp_path, tiny_model_dir, "grpo", rewards, mini_batch_size=2, ppo_epochs=2, beta=0.1,
                     micro_batch_size=1)
    results = train(config)
    out = tmp_path / "grpo"
    assert (out / "adapter_model.safetensors").is_file() and (out / "reward_curve.png").is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert all("policy/kl" in r and "reward/length_penalty" in r for r in lines)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "completion", "reward", "rewards"} <= set(samples[0])
    assert results["held_out_before"]["num_prompts"] == 4
    assert len(results["held_out_before"]["per_prompt"]) == len(results["held_out_after"]["per_prompt"]) == 4
    assert results["kl_estimator"] == "k3" and results["scale_rewards"] == "group"  # 'auto' for grpo
    paired = results["held_out_paired"]
    assert paired["wins"] + paired["losses"] + paired["ties"] == 4


def test_paired_comparison_by_hand():
    import pytest

    from tunelab.rollout.evaluate import paired_comparison

    # differences +1, +2, +3, 0, -0.5: the zero is dropped; ranks of |d| = 0.5, 1, 2, 3 -> 1, 2, 3, 4;
    # negative-rank sum 1 out of the 2**4 = 16 equally likely sign patterns, patterns with a sum <= 1:
    # {} and {1} -> one-sided 2/16, two-sided p = 4/16 = 0.25 (exact test, as scipy uses for n < 50).
    out = paired_comparison([0.0, 0.0, 0.0, 1.0, 1.0], [1.0, 2.0, 3.0, 1.0, 0.5])
    assert out == {"mean_diff": pytest.approx(5.5 / 5), "wins": 3, "losses": 1, "ties": 1, "wilcoxon_p": 0.25}
    assert paired_comparison([1.0, 2.0], [1.0, 2.0])["wilcoxon_p"] is None
    with pytest.raises(ValueError, match="same prompts"):
        paired_comparison([1.0], [1.0, 2.0])


def test_ppo_recipe_runs_with_value_head_and_kl(tmp_path, tiny_model_dir):
    from tunelab.recipes.ppo import train

    rewards = [{"type": "length_penalty", "max_tokens": 2}, {"type": "exact_match", "weight": 0.5}]
    config = _config(tmp_path, tiny_model_dir, "ppo", rewards, num_generations=2, ppo_epochs=2, mini_batch_size=2,
                     adaptive_kl=True, kl_target=0.01, kl_horizon=100, kl_estimator="k3", value_lr=1e-2)
    train(config)
    out = tmp_path / "ppo"
    assert (out / "value_head.safetensors").is_file() and (out / "adapter_model.safetensors").is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for key in ("kl", "kl_coef", "entropy", "policy/clip_frac", "policy/approx_kl", "value/explained_variance",
                "value/loss", "reward/mean", "reward/std", "reward/normalized_mean", "length/mean",
                "advantages/applied", "advantages/num_valid"):
        assert key in lines[0], key
    assert lines[0]["kl"] == 0.0  # first rollout comes from the reference itself (LoRA B = 0)
    assert lines[1]["kl_coef"] != lines[0]["kl_coef"]  # adaptive controller moved


def test_ppo_with_a_reward_model_run(tmp_path, tiny_model_dir, smollm2_tokenizer):
    """The reward_model term loads a sequence-classifier run dir and scores prompt + completion."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tunelab.recipes.ppo import train

    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=smollm2_tokenizer.pad_token_id))
    rm_dir = tmp_path / "rm"
    rm.save_pretrained(rm_dir)
    smollm2_tokenizer.save_pretrained(rm_dir)
    config = _config(tmp_path, tiny_model_dir, "ppo", [{"type": "reward_model", "run_dir": str(rm_dir)}],
                     num_generations=1, kl_coef=0.1)
    train(config)
    lines = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward/reward_model"] != 0 and r["reward/std"] > 0 for r in lines)


def test_reward_model_run_dir_missing_is_a_clear_error(tmp_path):
    from tunelab.config.rl import RewardModelReward
    from tunelab.rollout.rewards import RewardError, build_reward_terms

    with pytest.raises(RewardError, match=r"rl.rewards\[0\].run_dir=.*nope: run directory not found.*task: reward"):
        build_reward_terms([RewardModelReward(type="reward_model", run_dir=str(tmp_path / "nope"))])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardError, match=r"rl.rewards\[0\].run_dir=.*empty: .*not a tunelab run"):
        build_reward_terms([RewardModelReward(type="reward_model", run_dir=str(tmp_path / "empty"))])


def test_a_run_that_is_not_a_reward_model_is_refused(tmp_path, tiny_model_dir, smollm2_tokenizer):
    """An SFT/PPO run (causal LM) or a 3-class classifier would be loaded with a fresh or wrong head."""
    import json as _json

    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tunelab.config.rl import RewardModelReward
    from tunelab.rollout.rewards import RewardError, build_reward_terms

    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "tunelab.json").write_text(_json.dumps({"method": "full", "base_model": "x", "task_type": "CAUSAL_LM"}))
    with pytest.raises(RewardError, match=r"rl.rewards\[1\].run_dir=.*sft is a tunelab run with task_type CAUSAL_LM"):
        build_reward_terms([_exact(), RewardModelReward(type="reward_model", run_dir=str(sft))])
    classifier = tmp_path / "classifier"
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=smollm2_tokenizer.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_labels=3,
        pad_token_id=smollm2_tokenizer.pad_token_id)).save_pretrained(classifier)
    smollm2_tokenizer.save_pretrained(classifier)
    with pytest.raises(RewardError, match="head has 3 outputs"):
        build_reward_terms([RewardModelReward(type="reward_model", run_dir=str(classifier))])


def _exact():
    from tunelab.config.rl import ExactMatchReward

    return ExactMatchReward(type="exact_match")


def test_held_out_prompts_that_are_also_training_prompts_are_dropped(tmp_path, tiny_model_dir):
    """A validation file sharing a prompt with train: that prompt is not "held out" (never trained on)."""
    from rich.console import Console

    from tunelab.data.builtin import load_builtin
    from tunelab.rollout.session import open_session

    train = load_builtin("arithmetic", "add", "train")[:40]
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps(train[3]) + "\n" + json.dumps({"prompt": "What is 2 plus 2?", "answer": "4"}) + "\n")
    config = _config(tmp_path, tiny_model_dir, "grpo", [{"type": "exact_match"}])
    config.data.validation = type(config.data.train)(path=str(held))
    session = open_session(config, torch.device("cpu"), Console(quiet=True))
    assert [p.text for p in session.held_out] == ["What is 2 plus 2?"]
    assert session.num_held_out_in_train == 1


def test_held_out_prompts_stop_at_max_validation_examples(tmp_path, tiny_model_dir):
    """data.max_validation_examples applies to RL prompts too (issue 18; the session read the whole split before)."""
    from rich.console import Console

    from tunelab.rollout.session import open_session

    config = _config(tmp_path, tiny_model_dir, "grpo", [{"type": "exact_match"}])
    config.data.max_validation_examples = 3
    session = open_session(config, torch.device("cpu"), Console(quiet=True))
    assert len(session.held_out) == 3  # eval_prompts is 4


def test_value_head_learning_rate_defaults_to_ten_times_the_policy_lr(tmp_path, tiny_model_dir):
    from tunelab.models.value_head import ValueHead
    from tunelab.recipes.ppo import value_param_group

    rewards = [{"type": "exact_match"}]
    head = ValueHead(8)
    group = value_param_group(head, _config(tmp_path, tiny_model_dir, "ppo", rewards))
    assert group["lr"] == 1e-2 and group["weight_decay"] == 0.0 and len(group["params"]) == 2  # train.lr 1e-3
    assert value_param_group(head, _config(tmp_path, tiny_model_dir, "ppo", rewards, value_lr=5e-4))["lr"] == 5e-4


def test_rl_optimizer_step_refuses_a_non_finite_gradient():
    import torch

    from tunelab.errors import TunelabError
    from tunelab.rollout.batch import optimizer_step

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    (weight * float("inf")).sum().backward()
    with pytest.raises(TunelabError, match="gradient norm is (inf|nan); no update"):
        optimizer_step(optimizer, scheduler, 1.0)
    assert torch.equal(weight.detach(), torch.ones(3)) and weight.grad is None


def test_rl_metrics_log_the_rate_each_step_used_with_the_warmup_convention(tmp_path, tiny_model_dir):
    """Issue 14 rule 1 for RL: one update per step, warmup 2 → step 1 logs lr/2, step 2 the peak lr
    (the old code logged the rate after the scheduler moved: lr, then a decayed rate)."""
    from tunelab.recipes.grpo import train

    config = _config(tmp_path, tiny_model_dir, "grpo", [{"type": "exact_match"}])
    config.train.warmup_steps = 2
    config.train.max_steps = 3
    train(config)
    lines = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    # step 3: cosine halfway from the peak (step 2) towards 0 one step after the last: 0.5 (1 + cos(pi/2)) = 0.5
    assert [r["lr"] for r in lines] == pytest.approx([5e-4, 1e-3, 5e-4])
