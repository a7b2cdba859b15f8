"""QLoRA's frozen 4-bit base: NF4 weights with double quantization (Dettmers et al. 2023, arXiv:2305.14314).

NF4 (§3, "4-bit NormalFloat"): each block of 64 weights is scaled by its absmax ``c`` and every
scaled value is replaced by the nearest of 16 levels ``q_i`` (quantiles of N(0, 1) rescaled to
[-1, 1], exact zero included); the weight is read back as ``c · q_i``. Double quantization (§3)
stores the block absmaxes themselves in int8: the mean is subtracted and each group of (up to)
256 absmaxes is scaled by ``128 / absmax`` of the group, rounded and clamped to [-128, 127]. Storage: 4 bits per weight
+ 8 bits per 64 weights + one float per group ≈ 4.13 bits, vs 16 for bf16.

The tensors come from torchao's ``NF4Tensor`` (the one torchtune trains QLoRA with, CPU and CUDA).
Only ``nn.Linear`` layers of the frozen base are quantized: never the output head, norms,
embeddings, or modules trained in full (``modules_to_save``). LoRA weights stay float32 on top.

Deliberate simplifications: the group size of the double quantization is the largest divisor of
the number of blocks that is ≤ 256 (torchao needs whole groups; 256 for the usual shapes, e.g.
SmolLM2's 192 × 576 k_proj gets 216); a layer whose weight count is not a multiple of 64 is refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.errors import TunelabError

BLOCK_SIZE = 64
MAX_SCALER_BLOCK = 256
SUPPORTED_DEVICES = ("cpu", "cuda")
NF4_PARTS = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")


def _torchao_nf4() -> Any:
    """torchao's NF4 module (imported lazily: only QLoRA runs need it).

    Raises:
        TunelabError: torchao is not installed.
    """
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError as err:
        raise TunelabError(f"model.quantize: nf4 needs torchao (pip install 'tunelab[qlora]', or 'torchao>=0.18'): {err}") from err
    return nf4_tensor


def scaler_block_size(num_weights: int, block_size: int = BLOCK_SIZE) -> int:
    """Absmaxes per double-quantization group: the largest divisor of the block count that is ≤ 256."""
    num_blocks = num_weights // block_size
    return max(d for d in range(1, min(MAX_SCALER_BLOCK, num_blocks) + 1) if num_blocks % d == 0)


def quantize_weight(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """An (out, in) float weight as a torchao ``NF4Tensor`` (same shape and dtype, ~4.13 bits a weight).

    Raises:
        TunelabError: the weight count is not a multiple of 64 (naming ``model.quantize`` and the layer).
    """
    if weight.numel() % BLOCK_SIZE:
        raise TunelabError(
            f"model.quantize: nf4 quantizes blocks of {BLOCK_SIZE} weights, but {name} has shape "
            f"{tuple(weight.shape)} ({weight.numel()} weights, not a multiple of {BLOCK_SIZE}); use model.quantize: none"
        )
    nf4 = _torchao_nf4()
    return nf4.to_nf4(weight.detach().contiguous(), BLOCK_SIZE, scaler_block_size(weight.numel()))


def dequantize_nf4(weight: torch.Tensor) -> torch.Tensor:
    """The dense (out, in) weight of an ``NF4Tensor``, in its dtype: ``level[code] · absmax`` per block.

    Bit-identical to torchao's ``get_original_weight`` (same arithmetic in the same dtype) but one
    gather per byte from a 256-entry table of level pairs instead of two per-element gathers, a
    stack and a transpose: 1.5–2.4× faster on SmolLM2's shapes on a 2-core CPU
    (``python -m bench.qlora_dora dequant``, bench/results/nf4_dequant_speed.json). Absmaxes: ``int8 / group_factor + mean`` (double quantization undone).
    """
    levels = weight.nf4
    pairs = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1)  # byte b → (q[b >> 4], q[b & 15])
    values = F.embedding(weight.quantized_data.int(), pairs).view(weight.n_blocks, weight.block_size)
    groups = weight.quantized_scalers.numel() // weight.scaler_block_size
    absmax = (weight.quantized_scalers.view(groups, weight.scaler_block_size)
              / weight.quantization_factor.unsqueeze(-1)).flatten().to(weight.dtype) + weight.scaler_mean
    return (values * absmax.unsqueeze(-1)).view(weight.shape)


class _LinearNF4(torch.autograd.Function):
    """``x W^T`` with ``W`` dequantized in forward and again in backward (never kept between them)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.weight, ctx.x_dtype = weight, x.dtype  # a frozen parameter, not an activation
        return F.linear(x, dequantize_nf4(weight).to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (grad @ dequantize_nf4(ctx.weight).to(grad.dtype)).to(ctx.x_dtype), None


class NF4Linear(nn.Linear):
    """A frozen linear layer whose weight is stored as NF4 (forward dequantizes it blockwise on the fly).

    Subclasses ``nn.Linear`` (as torchtune's ``FrozenNF4Linear`` does) so LoRA targeting by name or
    ``all-linear`` sees it; the weight is never trained and cannot be modified in place.

    Shapes: input (..., in_features) → output (..., out_features), in the input's dtype (or autocast's).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias=False, device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "linear") -> NF4Linear:
        """Quantize an ``nn.Linear`` (its dtype and device are kept)."""
        return cls(quantize_weight(linear.weight, name), linear.bias)

    def __deepcopy__(self, memo: dict) -> NF4Linear:
        """An exact copy (torchao's ``clone`` re-quantizes the dequantized weight with default blocks)."""
        copy = NF4Linear(clone_nf4(self.weight), None if self.bias is None else self.bias.detach().clone())
        copy.train(self.training)
        memo[id(self)] = copy
        return copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        out = _LinearNF4.apply(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The dequantized (out, in) weight, the exact values the forward multiplies by."""
        return dequantize_nf4(self.weight)

    def dequantize(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (and the same bias)."""
        weight = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.clone(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:  # noqa: D102
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nf4"


def clone_nf4(weight: torch.Tensor) -> torch.Tensor:
    """A bit-exact copy of an ``NF4Tensor`` (its packed codes, absmaxes and factors cloned)."""
    nf4 = _torchao_nf4()
    inner = {p: getattr(weight, p).clone() for p in NF4_PARTS}
    return nf4.NF4Tensor(*nf4.construct_nf4_args(weight, inner))


def quantized_bytes(weight: torch.Tensor) -> int:
    """Bytes an ``NF4Tensor`` holds (packed 4-bit codes, int8 absmaxes, group factors, mean, level table)."""
    return sum(getattr(weight, p).numel() * getattr(weight, p).element_size() for p in NF4_PARTS)


def quantize_frozen_linears(model: nn.Module, exclude: list[str] = (), dtype: torch.dtype | None = None) -> list[str]:
    """Replace every frozen-base ``nn.Linear`` by an :class:`NF4Linear`, in place.

    ``dtype``: quantize the weights as cast to this dtype (the NF4 tensor keeps it; used to rebuild
    the exact quantized base a run was trained on, see :func:`quantization_record`). Skipped: the output head (``get_output_embeddings()``), modules named in ``exclude`` (and their
    children, e.g. a classification head trained in full) and LoRA's own ``lora_A``/``lora_B``.

    Returns:
        The quantized module names.

    Raises:
        TunelabError: a weight on a device other than CPU/CUDA, or a shape NF4 cannot block (both name
            ``model.quantize``).
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, NF4Linear) and module is not output and ".lora_" not in name
        and not any(name == e or name.startswith(e + ".") for e in exclude)
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if linear.weight.device.type not in SUPPORTED_DEVICES:
            raise TunelabError(f"model.quantize: nf4 runs on {'/'.join(SUPPORTED_DEVICES)} (torchao), not on "
                               f"device {linear.weight.device.type}; use model.quantize: none")
        if dtype is not None and linear.weight.dtype != dtype:
            linear = linear.to(dtype)
        setattr(parent, child, NF4Linear.from_linear(linear, name))
    return names


def quantization_record(model: nn.Module) -> dict[str, Any] | None:
    """What a run's ``tunelab.json`` records about a quantized base, or None for a plain one:
    ``{"format": "nf4", "block_size": 64, "dtype": "float32"}`` (the dtype the weights were quantized from)."""
    layer = next((m for m in model.modules() if isinstance(m, NF4Linear)), None)
    if layer is None:
        return None
    return {"format": "nf4", "block_size": BLOCK_SIZE, "dtype": str(layer.weight.dtype).removeprefix("torch.")}


def requantize_from_record(model: nn.Module, record: dict[str, Any], exclude: list[str] = ()) -> list[str]:
    """Quantize a freshly loaded base as a :func:`quantization_record` says (same format, same source dtype).

    Raises:
        TunelabError: a format this tunelab does not know.
    """
    if record.get("format") != "nf4":
        raise TunelabError(f"base_quantization {record!r}: unknown format (this tunelab knows nf4)")
    return quantize_frozen_linears(model, exclude, dtype=getattr(torch, record.get("dtype", "float32")))


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every :class:`NF4Linear` by its dequantized ``nn.Linear``, in place (e.g. before saving)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.dequantize())
    return model

