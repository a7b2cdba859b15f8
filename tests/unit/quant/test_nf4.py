"""NF4 with double quantization (QLoRA, arXiv:2305.14314 §3) on toy weights whose values are worked out by hand."""

import copy

import pytest
import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.quant.nf4 import NF4Linear, dequantize_nf4, quantize_frozen_linears, quantize_weight, quantized_bytes, scaler_block_size

pytest.importorskip("torchao")

# torchao's 16 NF4 levels (N(0,1) quantiles scaled to [-1, 1], 4 decimals), index = the 4-bit code
LEVELS = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379,
          0.4407, 0.5626, 0.7230, 1.0]


def toy_weight():
    """Two blocks of 64: block 0 holds 2 × every level (absmax 2), block 1 holds 0.3, -1.0, 0.05 (absmax 1)."""
    weight = torch.zeros(2, 64)
    weight[0, :16] = 2 * torch.tensor(LEVELS)
    weight[1, :3] = torch.tensor([0.3, -1.0, 0.05])
    return weight


def test_dequantized_toy_weight_equals_the_hand_computed_values():
    # Double quantization of the absmaxes [2, 1]: mean 1.5, centred [0.5, -0.5], group absmax 0.5, factor
    # 256 / (2 · 0.5) = 256, codes round([128, -128]) clamped to [127, -128], read back as 127/256 + 1.5 =
    # 1.99609375 and -128/256 + 1.5 = 1.0. Block 0 keeps its levels exactly (scaled by 1.99609375); in block 1,
    # 0.3 → nearest level 0.3379 (0.0379 away, 0.2461 is 0.0539), 0.05 → 0.0796 (0.0 is 0.05 away).
    expected = torch.zeros(2, 64)
    expected[0, :16] = 1.99609375 * torch.tensor(LEVELS)
    expected[1, :3] = torch.tensor([0.3379, -1.0, 0.0796])
    nf4 = quantize_weight(toy_weight())
    assert nf4.shape == (2, 64) and nf4.dtype == torch.float32
    assert torch.allclose(nf4.get_original_weight(), expected, atol=1e-6)
    codes = torch.stack([nf4.quantized_data >> 4, nf4.quantized_data & 0xF], dim=-1).flatten()
    assert codes[:16].tolist() == list(range(16)) and codes[64:67].tolist() == [11, 0, 8]
    assert nf4.quantized_scalers.tolist() == [127, -128]
    # 64 bytes of packed codes + 2 int8 absmaxes + one fp32 group factor + fp32 mean + the 16-level fp32 table
    assert quantized_bytes(nf4) == 64 + 2 + 4 + 4 + 64


def test_round_trip_error_is_bounded_by_half_the_widest_level_gap():
    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    deq = quantize_weight(weight).get_original_weight()
    absmax = weight.view(-1, 64).abs().amax(dim=1, keepdim=True)
    gap = max(b - a for a, b in zip(LEVELS, LEVELS[1:]))  # 0.2770 between 0.7230 and 1.0
    # half a gap of the block's own scale, plus what the int8 absmax costs (≤ 1/256 of the group's centred range)
    bound = (gap / 2) * absmax + (absmax.max() - absmax.min()) / 256 + 1e-6
    assert ((deq - weight).view(-1, 64).abs() <= bound).all()
    assert (deq - weight).abs().mean() < 0.1 * weight.abs().mean() + 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dequantization_is_bit_identical_to_torchaos(dtype):
    torch.manual_seed(0)
    nf4 = quantize_weight(torch.randn(192, 576).to(dtype))  # 1728 blocks: groups of 216
    assert torch.equal(dequantize_nf4(nf4), nf4.get_original_weight())
    assert dequantize_nf4(nf4).dtype == dtype


def test_scaler_groups_divide_the_block_count():
    assert scaler_block_size(2048 * 2048) == 256  # Llama shapes: the QLoRA paper's 256
    assert scaler_block_size(192 * 576) == 216  # SmolLM2's k_proj: 1728 blocks
    assert scaler_block_size(16 * 32) == 8


def test_nf4_linear_forward_and_backward_use_the_dequantized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = NF4Linear.from_linear(linear)
    x = torch.randn(3, 5, 64, requires_grad=True)
    out = layer(x)
    reference = nn.functional.linear(x, layer.dense_weight(), linear.bias)
    assert torch.allclose(out, reference, atol=1e-6)
    grad = torch.randn_like(out)
    (g_ours,) = torch.autograd.grad(out, x, grad)
    (g_ref,) = torch.autograd.grad(reference, x, grad)
    assert torch.allclose(g_ours, g_ref, atol=1e-5)
    assert not any(p.requires_grad for p in layer.parameters())
    plain = layer.dequantize()
    assert type(plain) is nn.Linear and torch.equal(plain(x), out)
    copied = copy.deepcopy(layer)  # bit-exact (torchao's own clone would re-quantize)
    assert torch.equal(copied.weight.quantized_data, layer.weight.quantized_data)
    assert torch.equal(copied.dense_weight(), layer.dense_weight())


def test_a_shape_nf4_cannot_block_is_an_error_naming_model_quantize():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(5, 3))
    with pytest.raises(TunelabError, match=r"model\.quantize.*1 has shape \(3, 5\)"):
        quantize_frozen_linears(model)


def test_a_device_the_backend_cannot_handle_is_an_error_naming_model_quantize():
    model = nn.Sequential(nn.Linear(64, 64, device="meta"))
    with pytest.raises(TunelabError, match=r"model\.quantize.*device meta"):
        quantize_frozen_linears(model)


def test_under_bf16_autocast_the_matmul_runs_in_bf16_and_the_input_gradient_keeps_its_dtype():
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(nn.Linear(64, 32).to(torch.bfloat16))
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32
    expected = torch.ones(4, 32, dtype=torch.bfloat16) @ layer.dense_weight()
    assert torch.allclose(x.grad, expected.float(), atol=1e-2)
