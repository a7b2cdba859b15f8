"""LoRA invariants: init is a no-op, merged ≡ unmerged, disabled() ≡ base, PEFT round trips."""

import copy

import pytest
import torch

from tunelab.adapters.lora import disabled, inject_lora, lora_layers, merge_lora
from tunelab.adapters.peft_format import load_adapter, save_adapter
from tests.conftest import make_tiny_llama
from tunelab.errors import ConfigError

IDS = torch.tensor([[1, 5, 9, 14, 3, 7, 22, 2], [1, 40, 41, 42, 43, 44, 45, 2]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize_lora(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1


def test_init_is_exactly_the_base_model():
    base = make_tiny_llama()
    adapted = copy.deepcopy(base)
    names = inject_lora(adapted, "all-linear", r=4, alpha=8)
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    assert torch.equal(logits(adapted), logits(base))
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_merged_equals_unmerged_and_disabled_equals_base():
    base = make_tiny_llama()
    adapted = copy.deepcopy(base)
    inject_lora(adapted, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, use_rslora=True)
    randomize_lora(adapted)
    unmerged = logits(adapted)
    assert not torch.allclose(unmerged, logits(base), atol=1e-4)
    with disabled(adapted):
        assert torch.allclose(logits(adapted), logits(base), atol=1e-6)
    merged = merge_lora(copy.deepcopy(adapted))
    assert not list(lora_layers(merged))
    assert torch.allclose(logits(merged), unmerged, atol=1e-5)


def test_target_module_that_matches_nothing_is_an_error():
    with pytest.raises(ConfigError, match="matches no linear layer.*q_proj"):
        inject_lora(make_tiny_llama(), ["qkv"], r=4, alpha=8)


def test_adapter_written_by_tunelab_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = make_tiny_llama()
    base.save_pretrained(tmp_path / "base")
    adapted = copy.deepcopy(base)
    inject_lora(adapted, "all-linear", r=4, alpha=16)
    randomize_lora(adapted)
    save_adapter(adapted, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    peft_model = peft.PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter")
    assert torch.allclose(logits(peft_model), logits(adapted), atol=1e-5)


def test_adapter_written_by_peft_loads_in_tunelab(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "gate_proj"], use_rslora=True)
    peft_model = peft.get_peft_model(make_tiny_llama(), config)
    gen = torch.Generator().manual_seed(3)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.1
    peft_model.save_pretrained(tmp_path / "peft")
    ours = make_tiny_llama()
    load_adapter(ours, tmp_path / "peft")
    assert torch.allclose(logits(ours), logits(peft_model), atol=1e-5)
