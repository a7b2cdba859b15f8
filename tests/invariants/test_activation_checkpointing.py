"""Activation checkpointing with LoRA: no "does not require grad" failure, same gradients."""

import torch

from tunelab.adapters.lora import inject_lora
from tunelab.models.causal_lm import lm_loss
from tunelab.recipes.prepare import enable_gradient_checkpointing
from tunelab.training.precision import autocast
from tests.conftest import make_tiny_llama

BATCH = {"input_ids": torch.tensor([[1, 5, 9, 14, 3, 7, 22, 2, 1, 40, 41, 2]]),
         "labels": torch.tensor([[-100, -100, 9, 14, 3, 7, 22, 2, -100, -100, 41, 2]]),
         "position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]])}


def lora_grads(checkpointing: bool):
    model = make_tiny_llama()
    inject_lora(model, "all-linear", r=4, alpha=8)
    gen = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=gen)
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    loss, _ = lm_loss(model, BATCH, 8)
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointed_gradients_equal_plain_with_lora():
    loss_plain, plain = lora_grads(False)
    loss_ckpt, ckpt = lora_grads(True)
    assert abs(loss_plain - loss_ckpt) < 1e-6
    assert plain.keys() == ckpt.keys() and plain
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], atol=1e-6), name


def test_cpu_bf16_autocast_loss_close_to_fp32():
    """precision=bf16 on CPU: same loss as fp32 within 2% relative (bf16 has an 8-bit mantissa)."""
    model = make_tiny_llama()
    with torch.no_grad():
        fp32, _ = lm_loss(model, BATCH, 8)
        with autocast("bf16", torch.device("cpu")):
            bf16, _ = lm_loss(model, BATCH, 8)
    assert bf16.dtype == torch.float32
    assert abs(float(bf16) - float(fp32)) / float(fp32) < 0.02
