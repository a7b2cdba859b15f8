"""Config section ``rl:`` for the online RL recipes (``task: grpo`` and ``task: ppo``).

Defaults live here and only here. One RL *step* = sample completions for ``train.batch_size``
prompts (``num_generations`` each for GRPO, one each for PPO), score them, then run ``ppo_epochs``
passes over mini-batches of ``mini_batch_size`` completions, one optimizer step per mini-batch.
``train.max_steps`` counts RL steps.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from tunelab.config.base import StrictModel


class ExactMatchReward(StrictModel):
    """1.0 when the answer taken from the completion equals the record's reference answer, else 0.0."""

    type: Literal["exact_match"] = Field(description="Reward kind: exact_match, regex, length_penalty, reward_model or python.")
    weight: float = Field(1.0, description="Multiplies this reward before rewards are summed.")
    reference_field: str = Field("answer", description="Record field holding the reference answer.")
    extract: Literal["last_number", "full", "regex"] = Field(
        "last_number",
        description="What to compare: the last number in the completion, the whole stripped completion, "
        "or group 1 (else the whole match) of the last match of `pattern`.",
    )
    pattern: str | None = Field(None, description="Regex for extract=regex.")

    @model_validator(mode="after")
    def _check(self) -> ExactMatchReward:
        if self.extract == "regex" and not self.pattern:
            raise ValueError("exact_match with extract=regex needs a `pattern`")
        return self


class RegexReward(StrictModel):
    """1.0 when the completion matches ``pattern`` (format reward), else 0.0."""

    type: Literal["regex"] = Field(description="Reward kind: exact_match, regex, length_penalty, reward_model or python.")
    weight: float = Field(1.0, description="Multiplies this reward before rewards are summed.")
    pattern: str = Field(description="Python regex.")
    mode: Literal["search", "fullmatch"] = Field(
        "fullmatch", description="'fullmatch': the whole stripped completion must match; 'search': anywhere."
    )


class LengthPenaltyReward(StrictModel):
    """``-max(0, n - max_tokens) / max_tokens`` for a completion of ``n`` tokens (0 when short enough)."""

    type: Literal["length_penalty"] = Field(description="Reward kind: exact_match, regex, length_penalty, reward_model or python.")
    weight: float = Field(1.0, description="Multiplies this reward before rewards are summed.")
    max_tokens: int = Field(ge=1, description="Completions up to this many tokens are not penalized.")


class RewardModelReward(StrictModel):
    """Score of a trained reward model (a ``task: reward`` run) on the prompt and completion."""

    type: Literal["reward_model"] = Field(description="Reward kind: exact_match, regex, length_penalty, reward_model or python.")
    weight: float = Field(1.0, description="Multiplies this reward before rewards are summed.")
    run_dir: str = Field(description="Finished reward-model run directory (task: reward), e.g. runs/rm; a relative "
                         "path starts from the working directory tunelab is run in.")
    batch_size: int = Field(16, ge=1, description="Sequences per reward-model forward pass.")


class PythonReward(StrictModel):
    """A function you write: ``def f(prompt: str, completion: str, example: dict) -> float``.

    Loaded from ``path/to/file.py:function`` and run in-process with your permissions (it is your
    own code: tunelab imports the file as is).
    """

    type: Literal["python"] = Field(description="Reward kind: exact_match, regex, length_penalty, reward_model or python.")
    weight: float = Field(1.0, description="Multiplies this reward before rewards are summed.")
    function: str = Field(description="'path/to/file.py:function_name' (path relative to the working directory).")


RewardSpec = Annotated[
    Union[ExactMatchReward, RegexReward, LengthPenaltyReward, RewardModelReward, PythonReward],
    Field(discriminator="type"),
]


class RLConfig(StrictModel):
    """Rollout, PPO, GRPO and reward settings."""

    # rollout
    num_generations: int = Field(
        4, ge=1, description="Completions sampled per prompt (GRPO group size G, >= 2; PPO: any >= 1)."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (log-probs use the same one).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (1 = off).")
    max_new_tokens: int = Field(64, ge=1, description="Completion budget in tokens.")
    max_prompt_len: int = Field(256, ge=1, description="Prompts longer than this (tokens) are dropped and counted.")
    mask_truncated: bool = Field(
        False, description="Leave completions that hit max_new_tokens without an end token out of the loss."
    )
    # update
    ppo_epochs: int = Field(1, ge=1, description="Passes over each rollout batch.")
    mini_batch_size: int | None = Field(
        None, ge=1, description="Completions per optimizer step (null = the whole rollout batch)."
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="Completions per forward/backward inside a mini-batch (null = all at once); "
        "gradients are weighted so the result equals one pass over the mini-batch.",
    )
    clip_eps: float = Field(0.2, gt=0, description="PPO/GRPO ratio clip range epsilon.")
    # PPO
    kl_estimator: Literal["auto", "k1", "k2", "k3", "abs"] = Field(
        "auto",
        description="Per-token KL-to-reference estimator (Schulman 2020, 'Approximating KL divergence'): 'k1' "
        "log p - log ref (unbiased, can be negative), 'k2' (log p - log ref)^2 / 2, 'k3' (r - 1) - log r with "
        "r = ref / p (unbiased, >= 0), 'abs' |log p - log ref|. It shapes the PPO reward (or enters the GRPO loss "
        "with rl.beta) and is the `kl` logged. 'auto' = k1 for ppo (Ziegler et al. 2019), k3 for grpo "
        "(Shao et al. 2024, Eq. 4).",
    )
    kl_coef: float = Field(0.05, ge=0, description="PPO: (initial) KL penalty coefficient beta.")
    adaptive_kl: bool = Field(False, description="PPO: adapt kl_coef toward kl_target (Ziegler et al. 2019).")
    kl_target: float = Field(6.0, gt=0, description="PPO adaptive KL: target KL per sequence (nats).")
    kl_horizon: float = Field(10000.0, gt=0, description="PPO adaptive KL: horizon in samples.")
    gamma: float = Field(1.0, ge=0, le=1, description="PPO: GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="PPO: GAE lambda.")
    vf_coef: float = Field(0.1, ge=0, description="PPO: value-loss weight.")
    value_clip_eps: float = Field(0.2, gt=0, description="PPO: value clip range.")
    whiten_advantages: bool = Field(True, description="PPO: whiten advantages over the batch.")
    normalize_scores: bool = Field(
        True, description="PPO: normalize reward scores to mean 0 / std 1 with running statistics over all "
        "rollouts so far (Ziegler et al. 2019 normalize the reward model on the initial policy's samples); "
        "the KL penalty is not rescaled.",
    )
    value_lr: float | None = Field(
        None, gt=0, description="PPO: learning rate of the value head (a fresh linear layer; null = 10 x train.lr, "
        "as both shipped PPO configs use). The warmup/decay schedule applies to it too.",
    )
    # GRPO
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="GRPO: divide the group-centred rewards by the std of their own group ('group', Shao et al. "
        "2024), by the std of the whole rollout batch ('batch', as TRL's scale_rewards='batch'), or not at all "
        "('none' = Dr. GRPO, Liu et al. 2025). 'std' is accepted as the old name of 'group'.",
    )
    beta: float = Field(0.0, ge=0, description="GRPO: KL-to-reference weight (0 skips the reference pass).")
    loss_normalization: Literal["token", "sequence"] = Field(
        "token", description="GRPO: average over all real completion tokens, or per sequence then over sequences."
    )
    # rewards and logging
    rewards: list[RewardSpec] = Field(default_factory=list, description="Reward terms, summed with their weights.")
    log_samples_every: int = Field(5, ge=1, description="RL steps between sample-completion JSONL lines.")
    num_logged_samples: int = Field(4, ge=1, description="Completions written to samples.jsonl each time.")
    eval_prompts: int = Field(32, ge=1, description="Held-out prompts scored (greedy) before and after training.")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("scale_rewards") == "std":
            data = {**data, "scale_rewards": "group"}
        return data

    def resolved_kl_estimator(self, task: str) -> str:
        """The KL estimator a ``task`` (ppo | grpo) uses: ``kl_estimator``, with 'auto' resolved."""
        if self.kl_estimator != "auto":
            return self.kl_estimator
        return "k3" if task == "grpo" else "k1"

    @staticmethod
    def check_for(task: str, rl: RLConfig | None) -> None:
        """Check the ``rl`` section against ``task`` (called by ``Config``'s validator).

        Raises:
            ValueError: an ``rl`` section on a non-RL task, an RL task without one or without
                rewards, or a GRPO group smaller than 2.
        """
        if task not in ("ppo", "grpo"):
            raise ValueError("the 'rl' section is read only by task=ppo and task=grpo")
        if rl is None or not rl.rewards:
            raise ValueError(f"task={task} needs rl.rewards, e.g. rl: {{rewards: [{{type: reward_model, run_dir: runs/rm}}]}}")
        if task == "grpo" and rl.num_generations < 2:
            raise ValueError("task=grpo needs rl.num_generations >= 2 (a group of one has no baseline)")
