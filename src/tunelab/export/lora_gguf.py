"""A LoRA adapter alone as a GGUF LoRA file, applied by llama.cpp on top of the base model's GGUF.

Layout (what llama.cpp's ``llama_adapter_lora_init`` reads, as ``convert_lora_to_gguf.py`` writes):
``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and for every adapted
weight ``<gguf name>.lora_a`` ``(r, in)`` and ``<gguf name>.lora_b`` ``(out, r)`` (torch shapes) in f32.
llama.cpp adds ``(alpha / r) · B A``; a layer whose scaling is not ``alpha / r`` (rsLoRA:
``alpha / sqrt(r)``) has the difference folded into B, so the result is exact for any scaling.
The architecture's value transform (the Llama q/k row permutation) applies to B only, since it
permutes output rows: ``P (B A) = (P B) A``.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import torch

from tunelab.adapters.lora import lora_layers
from tunelab.errors import TunelabError
from tunelab.export.architectures import arch_spec


def write_lora_gguf(model: torch.nn.Module, path: Path, *, name: str = "adapter") -> int:
    """Write the LoRA layers of ``model`` (adapters injected, not merged) to ``path``; returns their count.

    Raises:
        TunelabError: no LoRA layers, merged layers, an adapter on a tied output head, or a layer
            with no GGUF name.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise TunelabError("the model has no LoRA layers: a LoRA GGUF needs a LoRA run")
    if any(layer.merged for _, layer in layers):
        raise TunelabError("the LoRA layers are merged into the base weights; export the unmerged run")
    spec = arch_spec(model.config)
    name_map = gguf.get_tensor_name_map(spec.arch, model.config.num_hidden_layers)
    alpha = float(layers[0][1].alpha)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[spec.arch])
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        with torch.no_grad():
            for module_name, layer in layers:
                _add_layer(writer, name_map, spec, model, module_name, layer, alpha)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return len(layers)


def _add_layer(writer, name_map, spec, model, module_name, layer, alpha: float) -> None:
    weight_name = f"{module_name}.weight"
    if module_name == "lm_head" and model.config.tie_word_embeddings:
        raise TunelabError("a LoRA on a tied output head has no separate GGUF tensor to apply to")
    gguf_name = name_map.get_name(weight_name, try_suffixes=(".weight",))
    if gguf_name is None:
        raise TunelabError(f"LoRA layer '{module_name}' has no GGUF name for {gguf.MODEL_ARCH_NAMES[spec.arch]}")
    fold = layer.scaling / (alpha / layer.r)
    lora_b = spec.transform(weight_name, layer.lora_B.weight.float() * fold, model.config)
    writer.add_tensor(f"{gguf_name}.lora_a", layer.lora_A.weight.float().contiguous().numpy())
    writer.add_tensor(f"{gguf_name}.lora_b", lora_b.contiguous().numpy())
