"""Read and write adapters in PEFT's layout, which transformers, PEFT and vLLM load.

Directory: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``...lora_B.weight`` (PEFT drops its adapter
name ``default`` from saved keys), for DoRA ``...lora_magnitude_vector`` (``use_dora: true`` in the
config) and, for trained extra modules (e.g. a classification head),
``base_model.model.<module>.weight`` listed in ``modules_to_save``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.adapters.lora import LoRALinear, inject_lora, lora_layers
from tunelab.errors import ModelLoadError

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_state_dict(model: nn.Module, modules_to_save: list[str] = ()) -> dict[str, torch.Tensor]:
    """LoRA weights (and full weights of ``modules_to_save``) under PEFT key names."""
    state = {}
    for name, layer in lora_layers(model):
        state[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous()
        state[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous()
        if layer.use_dora:
            state[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach().contiguous()
    for module_name in modules_to_save:
        for pname, param in model.get_submodule(module_name).named_parameters():
            state[f"{PREFIX}{module_name}.{pname}"] = param.detach().contiguous()
    return state


def save_adapter(
    model: nn.Module, directory: str | Path, *, base_model_name_or_path: str, task_type: str = "CAUSAL_LM",
    modules_to_save: list[str] = (),
) -> None:
    """Write the adapter in PEFT layout into ``directory`` (created if needed)."""
    layers = dict(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRA layers to save")
    first = next(iter(layers.values()))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout,
        "use_rslora": first.use_rslora,
        "use_dora": first.use_dora,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "modules_to_save": list(modules_to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    save_file(adapter_state_dict(model, modules_to_save), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of an adapter directory.

    Raises:
        ModelLoadError: missing file, or an adapter type other than LoRA.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ModelLoadError(f"no {CONFIG_NAME} in {directory}: not a PEFT adapter directory")
    config = json.loads(path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    return config


def load_adapter(model: nn.Module, directory: str | Path) -> dict[str, Any]:
    """Inject LoRA layers as described by a PEFT adapter directory and load its weights.

    Works for adapters written by tunelab or by PEFT. Returns the adapter config.

    Raises:
        ModelLoadError: unsupported options (per-layer ranks, bias training) or keys that
            do not match the model.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    for option in ("rank_pattern", "alpha_pattern"):
        if config.get(option):
            raise ModelLoadError(f"{directory}: adapter uses {option}, which tunelab does not support yet")
    state = load_file(str(directory / WEIGHTS_NAME))
    lora_modules = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in state if ".lora_" in k})
    inject_lora(
        model, [f"re:{name.replace('.', '[.]')}" for name in lora_modules], r=config["r"],
        alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0) or 0.0,
        use_rslora=config.get("use_rslora", False), use_dora=bool(config.get("use_dora", False)),
    )
    own = {}
    for key, value in state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        name = _magnitude_key(name)
        for module_name in config.get("modules_to_save") or []:
            name = name.replace(f"{module_name}.modules_to_save.default.", f"{module_name}.")
        own[name] = value
    missing = [k for k in own if k not in dict(model.named_parameters())]
    if missing:
        raise ModelLoadError(f"{directory}: adapter weights do not match the model, e.g. {missing[:3]}")
    model.load_state_dict(own, strict=False)
    for module_name in config.get("modules_to_save") or []:
        model.get_submodule(_resolve_saved_module(model, module_name)).requires_grad_(True)
    for _, layer in lora_layers(model):
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
        if layer.use_dora:
            layer.lora_magnitude_vector.requires_grad_(True)
    return config


def _magnitude_key(name: str) -> str:
    """PEFT's DoRA magnitude is ``<module>.lora_magnitude_vector`` on disk (``...vector.default.weight``
    in a live PeftModel's state dict); tunelab's parameter is ``<module>.lora_magnitude_vector``."""
    for suffix in (".lora_magnitude_vector.default.weight", ".lora_magnitude_vector.weight"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".lora_magnitude_vector"
    return name


def _resolve_saved_module(model: nn.Module, module_name: str) -> str:
    for name, _ in model.named_modules():
        if name == module_name or name.endswith("." + module_name):
            return name
    raise ModelLoadError(f"modules_to_save entry '{module_name}' is not a module of the model")


__all__ = ["LoRALinear", "adapter_state_dict", "load_adapter", "read_adapter_config", "save_adapter"]
