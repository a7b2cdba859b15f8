"""What each exportable architecture writes: GGUF arch, hyperparameters, tensor transforms.

Tensor names come from ``gguf``'s own map (:func:`gguf.get_tensor_name_map`), the names llama.cpp
looks up. The value transforms are the ones llama.cpp's ``convert_hf_to_gguf.py`` applies, because
llama.cpp's compute graphs assume them:

* llama: the rows of ``q_proj``/``k_proj`` are permuted per head from HF's rotate-half RoPE layout
  to llama.cpp's interleaved-pair layout (:func:`permute_qk`);
* gemma3: RMSNorm weights are stored as ``1 + w`` (HF's Gemma norm multiplies by ``1 + w``,
  llama.cpp's by ``w``);
* qwen2: names only (q/k/v biases included).

A tied output head (``lm_head`` sharing the embedding) is not written: llama.cpp reuses
``token_embd.weight`` when ``output.weight`` is absent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import torch

from tunelab.errors import TunelabError


@dataclass(frozen=True)
class ArchSpec:
    """One HF ``model_type`` mapped to a llama.cpp architecture."""

    arch: gguf.MODEL_ARCH
    transform: Callable[[str, torch.Tensor, Any], torch.Tensor]
    extra_hparams: Callable[[gguf.GGUFWriter, Any], None]


def permute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF rotate-half rows → llama.cpp interleaved rows, per head.

    Args:
        weight: ``(num_heads * head_dim, in)`` (or ``(num_heads * head_dim,)`` for a bias).
        num_heads: heads of this projection (query heads for q, KV heads for k).

    Within each head, HF orders rows ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]`` (the two halves rotated
    together); llama.cpp wants ``[x_0, y_0, x_1, y_1, ...]``.
    """
    rows = weight.shape[0]
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _llama_transform(name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return permute_qk(tensor, config.num_attention_heads)
    if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return permute_qk(tensor, config.num_key_value_heads)
    return tensor


def _gemma3_transform(name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
    return tensor + 1 if name.endswith("norm.weight") else tensor


def _no_transform(name: str, tensor: torch.Tensor, config: Any) -> torch.Tensor:
    return tensor


def _llama_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
    writer.add_rope_dimension_count(head_dim(config))
    _rope_scaling(writer, config)


def _qwen2_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
    if getattr(config, "use_sliding_window", False):
        raise TunelabError("qwen2 with use_sliding_window=true: llama.cpp's qwen2 has no sliding window; "
                           "export a model trained without it")
    _rope_scaling(writer, config)


def _gemma3_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
    dim = head_dim(config)
    if config.query_pre_attn_scalar != dim:
        raise TunelabError(f"gemma3 with query_pre_attn_scalar={config.query_pre_attn_scalar} != head_dim={dim}: "
                           "llama.cpp scales attention by 1/sqrt(head_dim)")
    local_base = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {}).get("rope_theta")
    if local_base not in (None, 10000.0):
        raise TunelabError(f"gemma3 local RoPE base {local_base}: llama.cpp fixes it at 10000")
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(config.num_hidden_layers)]
    if list(getattr(config, "layer_types", expected)) != expected:
        raise TunelabError("gemma3 layer_types differ from llama.cpp's fixed pattern (every 6th layer global)")
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_sliding_window(config.sliding_window)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    _rope_scaling(writer, config, rope_section="full_attention")


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(gguf.MODEL_ARCH.LLAMA, _llama_transform, _llama_hparams),
    "qwen2": ArchSpec(gguf.MODEL_ARCH.QWEN2, _no_transform, _qwen2_hparams),
    "gemma3_text": ArchSpec(gguf.MODEL_ARCH.GEMMA3, _gemma3_transform, _gemma3_hparams),
}


def arch_spec(config: Any) -> ArchSpec:
    """The spec for a model's ``config.model_type``.

    Raises:
        TunelabError: an architecture with no GGUF mapping here; names the supported ones.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise TunelabError(f"GGUF export does not support architecture '{model_type}'; "
                           f"supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def head_dim(config: Any) -> int:
    """Per-head width: ``config.head_dim`` where set, else ``hidden_size // num_attention_heads``."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_theta(config: Any, rope_section: str | None = None) -> float:
    """The RoPE base from ``rope_parameters`` (transformers 5) or the older ``rope_theta``."""
    params = _rope_params(config, rope_section)
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _rope_params(config: Any, rope_section: str | None = None) -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope_section and rope_section in params:
        params = dict(params[rope_section])
    return params


def write_hparams(writer: gguf.GGUFWriter, config: Any, spec: ArchSpec) -> None:
    """The hyperparameters llama.cpp reads for every architecture here, then the arch-specific ones."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    section = "full_attention" if spec.arch == gguf.MODEL_ARCH.GEMMA3 else None
    writer.add_rope_freq_base(rope_theta(config, section))
    if spec.arch != gguf.MODEL_ARCH.GEMMA3 and head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    spec.extra_hparams(writer, config)


def _rope_scaling(writer: gguf.GGUFWriter, config: Any, rope_section: str | None = None) -> None:
    """RoPE scaling as llama.cpp reads it; ``llama3`` scaling goes in a ``rope_freqs`` tensor instead.

    Raises:
        TunelabError: a rope type llama.cpp cannot express here (names it and the supported ones).
    """
    params = _rope_params(config, rope_section)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None, "llama3"):
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(params["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(params["factor"])
        writer.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
    else:
        raise TunelabError(f"rope scaling '{kind}' has no GGUF export; supported: default, linear, yarn, llama3")


def llama3_rope_factors(config: Any) -> np.ndarray | None:
    """Per-frequency divisors of Llama 3.1 RoPE scaling (``rope_freqs.weight``), or None.

    Shape ``(head_dim // 2,)`` float32: 1 for short wavelengths, ``factor`` for long ones, a smooth
    blend between (Llama 3.1 report; the same rule as transformers' ``_compute_llama3_parameters``).
    """
    params = _rope_params(config)
    if params.get("rope_type") != "llama3":
        return None
    dim, factor = head_dim(config), params["factor"]
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_len = params.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (rope_theta(config) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def gguf_tensors(model: torch.nn.Module, spec: ArchSpec) -> Iterator[tuple[str, np.ndarray]]:
    """``(gguf_name, float32 array)`` for every weight, transformed as llama.cpp expects.

    Raises:
        TunelabError: a weight ``gguf``'s name map does not know (it would be silently lost).
    """
    config = model.config
    name_map = gguf.get_tensor_name_map(spec.arch, config.num_hidden_layers)
    state = model.state_dict()
    tied = _is_tied(model)
    for name, tensor in state.items():
        if name == "lm_head.weight" and tied:
            continue
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise TunelabError(f"weight '{name}' has no GGUF name for {gguf.MODEL_ARCH_NAMES[spec.arch]}; "
                               "this model variant cannot be exported")
        yield gguf_name, spec.transform(name, tensor.detach().float(), config).contiguous().numpy()
    factors = llama3_rope_factors(config)
    if factors is not None:
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors


def _is_tied(model: torch.nn.Module) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and (head.weight is embed.weight or
                                 (head.weight.shape == embed.weight.shape and torch.equal(head.weight, embed.weight)))
