"""A scalar value head on a causal LM's final hidden states, for PPO.

``V(s_t) = w · h_t + b`` where ``h_t`` (H,) is the policy's last hidden state at the column that
predicts token t, as in Ziegler et al. 2019 (arXiv:1909.08593) and the InstructGPT/TRL PPO setup
(Ouyang et al. 2022, arXiv:2203.02155): policy and value share the transformer trunk, so the
value loss also shapes the trunk's trainable weights (LoRA adapters), scaled by ``rl.vf_coef``.

Saved beside the policy as ``value_head.safetensors`` (keys ``summary.weight``, ``summary.bias``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

FILENAME = "value_head.safetensors"


class ValueHead(nn.Module):
    """Linear map from hidden states to one value per position.

    Args:
        hidden_size: H of the policy.
        init_std: std of the normal init of the weight (bias starts at 0), small so initial
            values are near 0 and the first value loss is about ``0.5 * mean(returns ** 2)``.

    Shapes: ``(B, T, H)`` any float dtype → ``(B, T)`` float32 values in reward units.
    """

    def __init__(self, hidden_size: int, init_std: float = 0.01):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.summary.weight, std=init_std)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1).float()

    def save(self, directory: Path) -> None:
        """Write ``value_head.safetensors`` into ``directory``.

        Reads the parameters themselves (not ``state_dict()``), so under FSDP inside
        :meth:`~tunelab.training.distributed.Runtime.full_weights` the gathered whole tensors are saved."""
        save_file({k: v.detach().contiguous() for k, v in self.named_parameters()}, str(directory / FILENAME))

    @classmethod
    def load(cls, directory: Path) -> ValueHead:
        """Read a head saved by :meth:`save`."""
        state = load_file(str(directory / FILENAME))
        head = cls(state["summary.weight"].shape[1])
        head.load_state_dict(state)
        return head
