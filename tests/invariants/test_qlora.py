"""QLoRA invariants on a tiny Llama: what gets quantized, LoRA/DoRA init is a no-op on the NF4 base,
backward with activation checkpointing equals backward without, merged ≡ adapter on the quantized base."""

import copy

import pytest
import torch
from torch import nn

from tunelab.adapters.lora import inject_lora, lora_layers, merge_lora
from tunelab.quant.nf4 import NF4Linear, dequantize_model, quantization_record, quantize_frozen_linears
from tunelab.recipes.prepare import enable_gradient_checkpointing
from tests.conftest import make_tiny_llama

pytest.importorskip("torchao")
IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 2], [1, 40, 41, 42, 43, 44, 45, 2]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def qlora_model(use_dora=False, seed=0):
    model = make_tiny_llama(seed)
    quantize_frozen_linears(model)
    inject_lora(model, "all-linear", r=4, alpha=8, use_dora=use_dora)
    return model


def randomize(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1
        if layer.use_dora:
            layer.lora_magnitude_vector.data *= 1 + 0.2 * torch.randn(layer.out_features, generator=gen)


def test_only_the_decoder_linears_are_quantized():
    model = make_tiny_llama(tie=False)
    names = quantize_frozen_linears(model)
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert all(isinstance(model.get_submodule(n), NF4Linear) for n in names)
    assert model.model.norm.weight.dtype == torch.float32
    assert quantization_record(model) == {"format": "nf4", "block_size": 64, "dtype": "float32"}
    assert quantization_record(make_tiny_llama()) is None


@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_init_is_a_no_op_on_the_quantized_base(use_dora):
    reference = dequantize_model(_quantized_base())
    model = qlora_model(use_dora)
    assert torch.allclose(logits(model), logits(reference), atol=1e-5)
    assert not torch.allclose(logits(model), logits(make_tiny_llama()), atol=1e-3)  # quantization did change it
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 and not isinstance(p, NF4Linear) for p in trainable)


def _quantized_base():
    model = make_tiny_llama()
    quantize_frozen_linears(model)
    return model


@pytest.mark.parametrize("use_dora", [False, True])
def test_backward_with_activation_checkpointing_equals_without(use_dora):
    grads = []
    for checkpointing in (False, True):
        model = qlora_model(use_dora)
        randomize(model)
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_equals_the_adapter_on_the_quantized_base(use_dora):
    model = qlora_model(use_dora)
    randomize(model)
    on_quantized = logits(model)
    assert not torch.allclose(on_quantized, logits(_quantized_base()), atol=1e-3)
    merged = merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, NF4Linear) for m in merged.modules()) and not list(lora_layers(merged))
    assert torch.allclose(logits(merged), on_quantized, atol=1e-5)
    # and not the adapter merged into the original full-precision base (a different model)
    plain = make_tiny_llama()
    inject_lora(plain, "all-linear", r=4, alpha=8, use_dora=use_dora)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    assert not torch.allclose(logits(merge_lora(plain)), on_quantized, atol=1e-3)
