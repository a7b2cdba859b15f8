"""Per-token log-probabilities (and values) of sampled completions under policy and reference.

One forward pass over ``[prompt; completion]`` (prompt left-padded, completion right-padded, so
the attention mask is zero only at the two ends and ``position_ids`` count real tokens). The
hidden state at column ``P - 1 + t`` predicts completion token ``t``; only those ``C + 1``
columns go through the LM head, so prompt logits are never materialized. Log-probs are taken from
``logits / temperature``, the distribution the rollout sampled from (top-p truncation is not
applied, as in TRL; with ``top_p = 1`` the two are identical).

The reference policy of a LoRA run is the same model with adapters switched off
(:func:`tunelab.adapters.lora.disabled`); of a full fine-tune, a frozen copy made before training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tunelab.adapters.lora import disabled
from tunelab.losses.logprobs import IGNORE_INDEX, entropy_from_logits, token_logps
from tunelab.models.causal_lm import supports_hidden_state_loss
from tunelab.models.heads import position_ids_from_mask


@dataclass
class Scored:
    """Forward results for a rollout batch: ``logps`` (B, C) float32 nats, 0 at padding;
    ``entropy`` (B, C) float32 nats, no grad; ``values`` (B, C) or None (with a value head)."""

    logps: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor | None


def _completion_hidden(model: nn.Module, input_ids: torch.Tensor, attention: torch.Tensor, prompt_len: int):
    """Final hidden states (B, C + 1, H) at the columns that predict completion tokens (+ one extra)."""
    positions = position_ids_from_mask(attention)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                 use_cache=False).last_hidden_state
    return hidden[:, prompt_len - 1:]


def score_completions(
    model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
    completion_mask: torch.Tensor, *, temperature: float = 1.0, value_head: nn.Module | None = None,
) -> Scored:
    """Per-token log-probs of ``completion_ids`` given the prompts, with grad if enabled.

    Args:
        model: transformers causal LM (its train/eval mode is left as is; RL recipes keep it in
            eval mode so dropout cannot make old and new log-probs differ).
        prompt_ids, prompt_mask: (B, P) long / bool, left-padded.
        completion_ids, completion_mask: (B, C) long / bool, right-padded.
        temperature: logits are divided by it before the softmax.
        value_head: maps hidden states (B, C, H) to values (B, C); the value of the state
            before completion token t is read at the column that predicts t.

    Returns:
        :class:`Scored`.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, completion_mask], dim=1).long()
    prompt_len = prompt_ids.shape[1]
    labels = torch.where(completion_mask, completion_ids, torch.full_like(completion_ids, IGNORE_INDEX))
    labels = torch.cat([torch.full_like(labels[:, :1], IGNORE_INDEX), labels], dim=1)  # (B, C + 1)
    if supports_hidden_state_loss(model):
        hidden = _completion_hidden(model, input_ids, attention, prompt_len)
        logits = model.get_output_embeddings()(hidden)
    else:
        if value_head is not None:
            raise ValueError("a value head needs a model whose logits are a linear map of its hidden states")
        hidden = None
        positions = position_ids_from_mask(attention)
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                       use_cache=False).logits[:, prompt_len - 1:]
    logits = logits / temperature
    logps, _ = token_logps(logits, labels)
    with torch.no_grad():
        entropy = entropy_from_logits(logits[:, :-1])
    values = value_head(hidden[:, :-1]) if value_head is not None else None
    return Scored(logps, entropy, values)


@torch.no_grad()
def reference_logps(
    model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor,
    completion_mask: torch.Tensor, *, temperature: float = 1.0, reference: nn.Module | None = None,
) -> torch.Tensor:
    """(B, C) log-probs under the reference: ``reference`` if given, else ``model`` with LoRA disabled."""
    args = (prompt_ids, prompt_mask, completion_ids, completion_mask)
    if reference is not None:
        return score_completions(reference, *args, temperature=temperature).logps
    with disabled(model):
        return score_completions(model, *args, temperature=temperature).logps
