"""The ``distributed:`` config section: how one run spreads over several processes.

Launch with ``torchrun`` (or ``tunelab train --nproc N``); the section says what the processes
do together. Defaults live here only; unknown keys are errors.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunelab.config.base import StrictModel


class DistributedConfig(StrictModel):
    """Data-parallel (DDP) or sharded (FSDP2) training on ``torch.distributed``."""

    strategy: Literal["auto", "none", "ddp", "fsdp"] = Field(
        "auto",
        description="'ddp': every process holds the whole model, gradients are all-reduced; 'fsdp': "
        "parameters, gradients and optimizer state are sharded (FSDP2 fully_shard per decoder layer + root); "
        "'none': one process only; 'auto': none on one process, ddp under torchrun with several.",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="Collective backend; 'auto' = nccl on CUDA, gloo on CPU."
    )
    mixed_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="FSDP only: dtype parameters are all-gathered and computed in (master weights and "
        "optimizer state stay fp32); 'auto' follows train.precision (bf16 on a bf16-capable GPU, else fp32).",
    )
    reduce_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="FSDP only: dtype gradients are reduce-scattered in."
    )
    reshard_after_forward: bool = Field(
        True,
        description="FSDP only: free each layer's gathered weights after its forward and gather them again "
        "in backward (ZeRO-3 memory); false keeps them until backward (less communication, more memory).",
    )
    cpu_offload: bool = Field(
        False,
        description="FSDP only: keep sharded parameters, gradients and optimizer state in CPU memory "
        "(the optimizer step runs on the CPU); saves GPU memory at a large speed cost.",
    )
    timeout_s: int = Field(1800, ge=10, description="Seconds a collective may wait before the run fails.")
