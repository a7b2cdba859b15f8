"""Read and write adapters in PEFT's layout, which transformers, PEFT and vLLM load.

Directory: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight`` / ``...lora_B.weight`` (PEFT drops its adapter
name ``default`` from saved keys), for DoRA ``...lora_magnitude_vector`` (``use_dora: true`` in the
config) and, for trained extra modules (e.g. a classification head),
``base_model.model.<module>.weight`` listed in ``modules_to_save``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.adapters.integrity import (
    check_adapter_state, check_loaded_keys, check_savable, module_rank_alpha, rank_alpha_patterns,
)
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
            state[f"{PREFIX}{module_name}.{pname}"] = param.detach().clone()  # a tied head shares its weight
    return state


def save_adapter(
    model: nn.Module, directory: str | Path, *, base_model_name_or_path: str, task_type: str = "CAUSAL_LM",
    modules_to_save: list[str] = (), extra_config: dict[str, Any] | None = None,
) -> None:
    """Write the adapter in PEFT layout into ``directory`` (created if needed), config and weights together.

    Both files are written into a temporary sibling directory first. A new or empty ``directory`` is
    then replaced by it in one rename; into a directory holding other files the old
    ``adapter_config.json`` is removed first, the weights moved in, the config last, so a crash leaves
    no config beside weights it does not describe. Modules whose rank or alpha differ from the most
    common one are written as PEFT ``rank_pattern`` / ``alpha_pattern`` entries.

    Args:
        extra_config: more ``adapter_config.json`` keys (e.g. PEFT's ``trainable_token_indices``).

    Raises:
        ValueError: the model has no LoRA layers, or a tensor is sharded, empty or wrongly shaped
            (:func:`tunelab.adapters.integrity.check_savable`).
    """
    layers = dict(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRA layers to save")
    state = adapter_state_dict(model, modules_to_save)
    check_savable({k[len(PREFIX):]: v for k, v in state.items()}, layers)
    first = next(iter(layers.values()))
    r, alpha, rank_pattern, alpha_pattern = rank_alpha_patterns(layers)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": first.dropout,
        "use_rslora": first.use_rslora,
        "use_dora": first.use_dora,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "modules_to_save": list(modules_to_save) or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        **(extra_config or {}),
    }
    _write_together(Path(directory), config, state)


def _write_together(directory: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".tmp-{directory.name}-"))
    try:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
            os.replace(tmp, directory)
            return
        (directory / CONFIG_NAME).unlink(missing_ok=True)
        os.replace(tmp / WEIGHTS_NAME, directory / WEIGHTS_NAME)
        os.replace(tmp / CONFIG_NAME, directory / CONFIG_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    """Inject LoRA layers as described by a PEFT adapter directory and load its weights, all or nothing.

    Works for adapters written by tunelab or by PEFT, including per-module ranks and alphas
    (``rank_pattern`` / ``alpha_pattern``). Returns the adapter config.

    Raises:
        ModelLoadError: unsupported options (bias training), or an adapter that is partial or does
            not fit the model ("k of N adapter tensors matched", :mod:`tunelab.adapters.integrity`; a
            DoRA adapter lacking a module's ``lora_magnitude_vector`` too); then the model is left as it was.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    own = _own_names(load_file(str(directory / WEIGHTS_NAME)), config)
    modules = check_adapter_state(model, config, own, str(directory))
    if config.get("use_dora"):
        _check_magnitudes(modules, own, str(directory))
    groups: dict[tuple[int, float], list[str]] = {}
    for name in modules:
        groups.setdefault(module_rank_alpha(config, name), []).append(name)
    for (r, alpha), names in groups.items():
        inject_lora(model, [f"re:{re.escape(name)}" for name in names], r=r, alpha=alpha,
                    dropout=config.get("lora_dropout", 0.0) or 0.0, use_rslora=config.get("use_rslora", False),
                    use_dora=bool(config.get("use_dora", False)))
    check_loaded_keys(model, own, str(directory))
    model.load_state_dict(own, strict=False)
    for module_name in config.get("modules_to_save") or []:
        model.get_submodule(_resolve_saved_module(model, module_name)).requires_grad_(True)
    for _, layer in lora_layers(model):
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
        if layer.use_dora:
            layer.lora_magnitude_vector.requires_grad_(True)
    return config


def _own_names(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """PEFT key names → tunelab's (prefix, adapter name ``default`` and ``modules_to_save`` wrapper dropped)."""
    own = {}
    for key, value in state.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = re.sub(r"\.(lora_[A-Za-z_]+)\.default\.", r".\1.", name)
        name = re.sub(r"\.(lora_[A-Za-z_]+)\.default$", r".\1", name)
        name = re.sub(r"\.lora_magnitude_vector\.weight$", ".lora_magnitude_vector", name)  # DoRA: a parameter
        for module_name in config.get("modules_to_save") or []:
            name = name.replace(f"{module_name}.modules_to_save.default.", f"{module_name}.")
        own[name] = value
    return own


def _check_magnitudes(modules: list[str], own: dict[str, torch.Tensor], where: str) -> None:
    """A DoRA adapter must carry every adapted module's magnitude (else that layer would silently keep
    the base's row norms, i.e. a different model)."""
    missing = [f"{m}.lora_magnitude_vector" for m in modules if f"{m}.lora_magnitude_vector" not in own]
    if missing:
        raise ModelLoadError(f"{where}: a DoRA adapter (use_dora) without the magnitude of {len(missing)} of "
                             f"{len(modules)} modules, e.g. {missing[:3]}; it is incomplete, so it is not loaded")


def _resolve_saved_module(model: nn.Module, module_name: str) -> str:
    for name, _ in model.named_modules():
        if name == module_name or name.endswith("." + module_name):
            return name
    raise ModelLoadError(f"modules_to_save entry '{module_name}' is not a module of the model")


__all__ = ["LoRALinear", "adapter_state_dict", "load_adapter", "read_adapter_config", "save_adapter"]
