"""Generation and scoring for online RL (PPO/GRPO): prompts, sampling, rewards, log-probs, rollout batches."""
