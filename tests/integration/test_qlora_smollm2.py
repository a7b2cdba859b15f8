"""QLoRA on the real SmolLM2-135M: every decoder linear stored NF4 (its 192 × 576 k/v projections need
groups of 216 absmaxes), DoRA on top, and the merge into the dequantized base ≡ the adapter on the NF4 base."""

import copy

import pytest
import torch

from tunelab.adapters.lora import inject_lora, lora_layers, merge_lora
from tunelab.quant.nf4 import NF4Linear, quantize_frozen_linears

pytestmark = pytest.mark.integration
pytest.importorskip("torchao")


def test_smollm2_merged_equals_the_adapter_on_the_nf4_base():
    from tunelab.models.loading import load_model

    model = load_model("smollm2-135m-instruct").eval()
    names = quantize_frozen_linears(model)
    assert len(names) == 30 * 7 and all(isinstance(model.get_submodule(n), NF4Linear) for n in names)
    inject_lora(model, "all-linear", r=8, alpha=16, use_dora=True)
    gen = torch.Generator().manual_seed(0)
    for _, layer in lora_layers(model):
        layer.lora_B.weight.data = torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.01
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 2]])
    with torch.no_grad():
        on_nf4 = model(input_ids=ids).logits
        merged = merge_lora(copy.deepcopy(model))
        assert not any(isinstance(m, NF4Linear) for m in merged.modules())
        # fp32 sums over 30 layers: bounded by a small fraction of the logit scale
        assert (merged(input_ids=ids).logits - on_nf4).abs().max() < 1e-3 * on_nf4.abs().max()
