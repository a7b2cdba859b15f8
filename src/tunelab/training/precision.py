"""Device choice and mixed precision."""

from __future__ import annotations

import contextlib

import torch


def pick_device() -> torch.device:
    """CUDA if available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast context for ``precision`` ('auto', 'fp32', 'bf16').

    'auto' is bf16 autocast on a CUDA device with bf16 support, else fp32. Parameters and
    optimizer states stay fp32 (master weights) in every mode.
    """
    if precision == "fp32" or (precision == "auto" and (device.type != "cuda" or not torch.cuda.is_bf16_supported())):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
