"""What both RL recipes set up before their loop: tokenizer, prompts, policy, reward terms, order."""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from torch import nn

from tunelab.config.schema import Config
from tunelab.data.stop_tokens import stop_token_ids
from tunelab.data.templates import resolve_chat_template
from tunelab.models.loading import load_model, load_tokenizer
from tunelab.rollout.prompts import Prompt, PromptSet, load_prompts
from tunelab.rollout.rewards import RewardTerm, build_reward_terms
from tunelab.training.distributed import Runtime, single_process


@dataclass
class RLSession:
    """Everything an RL loop reads: model, tokenizer, train/held-out prompts, rewards, stop tokens, and which
    rank of the run this process is (``runtime``; one plain process by default) with its ``console``."""

    model: nn.Module
    tokenizer: Any
    train: PromptSet
    held_out: list[Prompt]
    num_held_out_too_long: int
    num_held_out_in_train: int  # validation prompts dropped because they are also training prompts
    terms: list[RewardTerm]
    stop_ids: list[int]
    device: torch.device
    runtime: Runtime = field(default_factory=single_process)
    console: Console = field(default_factory=lambda: Console(quiet=True))


def open_session(config: Config, device: torch.device, console: Console) -> RLSession:
    """Load tokenizer, prompts (over-long ones dropped and counted), the policy and the reward terms.

    Held-out prompts are ``data.validation`` if set (minus any prompt that is also a training prompt,
    so held-out means never trained on), else a seeded ``data.val_fraction`` of train (removed from
    train); at most ``rl.eval_prompts`` of them are scored.
    """
    mc, rl = config.model, config.rl
    tokenizer = load_tokenizer(mc.name_or_path, trust_remote_code=mc.trust_remote_code, revision=mc.revision)
    resolve_chat_template(tokenizer, mc.chat_template, config.data.system_prompt)
    train = load_prompts(config.data.train, config.data, tokenizer, rl.max_prompt_len, config.data.max_examples)
    held_too_long = 0
    held_in_train = 0
    if config.data.validation is not None:
        held = load_prompts(config.data.validation, config.data, tokenizer, rl.max_prompt_len)
        train_ids = {tuple(p.input_ids) for p in train.prompts}
        held_out = [p for p in held.prompts if tuple(p.input_ids) not in train_ids]
        held_too_long, held_in_train = held.num_too_long, len(held.prompts) - len(held_out)
    elif config.data.val_fraction > 0:
        order = list(range(len(train.prompts)))
        random.Random(config.train.seed).shuffle(order)
        chosen = set(order[:max(1, round(config.data.val_fraction * len(order)))])
        held_out = [p for i, p in enumerate(train.prompts) if i in chosen]
        train.prompts = [p for i, p in enumerate(train.prompts) if i not in chosen]
    else:
        held_out = []
    console.print(f"[bold]prompts[/] train {len(train.prompts)} (dropped {train.num_too_long} longer than "
                  f"{rl.max_prompt_len} tokens, {train.num_duplicates} duplicates), held-out {len(held_out)} "
                  f"(dropped {held_too_long} too long, {held_in_train} also in train)")
    model = load_model(mc.name_or_path, trust_remote_code=mc.trust_remote_code, allow_pickle=mc.allow_pickle,
                       revision=mc.revision, attn_implementation=mc.attn_implementation).to(device)
    model.eval()
    terms = build_reward_terms(rl.rewards, device)
    return RLSession(model, tokenizer, train, held_out[:rl.eval_prompts], held_too_long, held_in_train, terms,
                     stop_token_ids(tokenizer), device)


def num_rl_steps(config: Config, num_prompts: int, world_size: int = 1) -> int:
    """RL steps: ``train.max_steps``, else ``train.epochs`` passes over the prompts in steps of
    ``batch_size × world_size`` prompts (each rank takes ``batch_size``)."""
    if config.train.max_steps is not None:
        return config.train.max_steps
    return max(1, math.ceil(config.train.epochs * num_prompts / (config.train.batch_size * world_size)))


def prompts_for_step(prompts: list[Prompt], step: int, batch_size: int, seed: int, shuffle: bool) -> list[Prompt]:
    """The ``batch_size`` prompts of RL step ``step`` (0-based): epochs of a seeded permutation, wrapping."""
    out = []
    for index in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(index, len(prompts))
        order = list(range(len(prompts)))
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(prompts[order[offset]])
    return out


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of ``model`` (the reference policy of a full or freeze fine-tune)."""
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()
