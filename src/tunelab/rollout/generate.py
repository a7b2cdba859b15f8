"""Batched sampling of completions from a causal LM, with left-padded prompts and a KV cache.

Shapes: B rows, P prompt columns (left-padded: padding first, so every prompt ends at column
P - 1), C completion columns (right-padded: real tokens, then ``pad_id``). A completion ends at
its first stop token (EOS or the chat template's end-of-turn token, :mod:`tunelab.data.stop_tokens`), which is kept and counts as
a completion token, so the policy is also trained on when to stop.

Why our own loop and not ``model.generate``: the sampling distribution must be exactly
``softmax(logits / temperature)`` restricted to the top-p nucleus (no hidden ``top_k`` or
repetition penalty from a model's ``generation_config``), because the log-probs that PPO/GRPO
train on are computed from the same logits (see :mod:`tunelab.rollout.scoring`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tunelab.data.stop_tokens import stop_token_ids
from tunelab.models.heads import position_ids_from_mask

__all__ = ["Completions", "completion_mask", "sample_completions", "stop_token_ids"]  # stop ids live in data/



@dataclass
class Completions:
    """Sampled completions for a batch of prompts.

    Attributes:
        completion_ids: (B, C) long, right-padded with ``pad_id`` after the stop token.
        completion_mask: (B, C) bool, True on real completion tokens (through the first stop token).
        truncated: (B,) bool, True where no stop token came within ``max_new_tokens``.
    """

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    truncated: torch.Tensor


def completion_mask(completion_ids: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) bool mask True through the first stop token of each row, and (B,) ``truncated``.

    Tokens after the first stop token are padding (False), whatever their ids are.
    """
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))
    stops_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()  # stop tokens strictly before t
    return stops_before == 0, ~is_stop.any(dim=1)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool,
          generator: torch.Generator | None, row_generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Next token per row from (B, V) logits: argmax, or a sample from the top-p nucleus at ``temperature``
    (from ``row_generators``, one per row, when given: see :func:`sample_completions`)."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # mass before this token already > p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if row_generators is not None:
        return _inverse_cdf(probs, row_generators)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _inverse_cdf(probs: torch.Tensor, row_generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of (B, V) unnormalized ``probs``: row b draws one uniform from its own CPU
    generator and takes the first token whose cumulative mass exceeds it (zero-mass tokens never win)."""
    uniforms = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in row_generators])
    cdf = probs.double().cumsum(dim=-1)
    target = (uniforms.to(probs.device) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def sample_completions(
    model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
    stop_ids: list[int], pad_id: int, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
    generator: torch.Generator | None = None, row_seeds: list[int] | None = None,
) -> Completions:
    """Sample (or greedily decode) up to ``max_new_tokens`` tokens for each left-padded prompt.

    Args:
        model: a transformers causal LM; run in eval mode (dropout off) and restored after.
        prompt_ids: (B, P) long, left-padded.
        prompt_mask: (B, P) bool, True on real prompt tokens; the last column must be real.
        stop_ids: token ids that end a completion (see :func:`tunelab.data.stop_tokens.stop_token_ids`).
        pad_id: id written after a row has stopped.
        greedy: argmax decoding (then ``temperature``/``top_p`` are ignored).
        generator: torch RNG for sampling (default: the global one).
        row_seeds: one seed per row (B ints): row b then samples from its own CPU generator, one uniform
            per token, so its completion depends on its seed and logits only, never on the other rows of
            the batch (the RL recipes seed each row by step and global row number, which makes a run on
            N processes sample what one process would, and a resumed run what the uninterrupted one did).

    Returns:
        :class:`Completions` with C <= ``max_new_tokens`` columns (stops early when every row is done).

    Raises:
        ValueError: a prompt row does not end at the last column (not left-padded), or ``row_seeds``
            does not have one seed per row.
    """
    if row_seeds is not None and len(row_seeds) != prompt_ids.shape[0]:
        raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {prompt_ids.shape[0]} rows")
    if not bool(prompt_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: every row's last column must be a real token")
    was_training = model.training
    model.eval()
    attention = prompt_mask.long()
    positions = position_ids_from_mask(attention)
    out = model(input_ids=prompt_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    next_position = positions[:, -1:] + 1
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    stop = torch.tensor(stop_ids, device=prompt_ids.device)
    tokens = []
    row_generators = None if row_seeds is None else [torch.Generator().manual_seed(s) for s in row_seeds]
    for _ in range(max_new_tokens):
        token = _pick(out.logits[:, -1], temperature, top_p, greedy, generator, row_generators)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        done = done | torch.isin(token, stop)
        if bool(done.all()) or len(tokens) == max_new_tokens:
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention, position_ids=next_position,
                    cache=out.cache, use_cache=True)
        next_position = next_position + 1
    model.train(was_training)
    ids = torch.stack(tokens, dim=1)
    mask, truncated = completion_mask(ids, stop_ids)
    return Completions(torch.where(mask, ids, torch.full_like(ids, pad_id)), mask, truncated)
