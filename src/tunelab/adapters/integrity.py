"""An adapter loads whole or not at all, and only whole adapters are written.

Loading (:func:`check_adapter_state`): every module the adapter config targets in this model, and
every module the weights file names, must have both ``lora_A`` (r × in_features) and ``lora_B``
(out_features × r) with the rank PEFT would give it (``r``, or its ``rank_pattern`` entry), and
each ``modules_to_save`` tensor must have the model's shape. Otherwise the adapter is refused with
"k of N adapter tensors matched" and example keys, so a partial adapter never serves the base model
for the layers it lacks. Other per-module LoRA tensors (DoRA's ``lora_magnitude_vector``) are
checked by name and shape against the model once the layers exist (:func:`check_loaded_keys`).

Saving (:func:`check_savable`): no sharded (``DTensor``, not gathered), meta, empty or wrongly
shaped LoRA tensor is written.

Per-module rank and alpha follow PEFT's ``rank_pattern`` / ``alpha_pattern``: a pattern key
matches a module name when ``re.match(rf"(.*\\.)?({key})$", name)`` does (peft.utils.other.get_pattern_key).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch
from torch import nn

from tunelab.errors import ModelLoadError

LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
UNSUPPORTED_PARTS = ("lora_embedding_A", "lora_embedding_B", "lora_bias")


def pattern_value(patterns: dict[str, Any] | None, name: str, default: Any) -> Any:
    """PEFT's per-module value: the first ``patterns`` key matching module ``name``, else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def module_rank_alpha(config: dict[str, Any], name: str) -> tuple[int, float]:
    """(r, alpha) of module ``name`` under an ``adapter_config.json`` (with rank/alpha patterns)."""
    return (int(pattern_value(config.get("rank_pattern"), name, config["r"])),
            float(pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"])))


def targeted_modules(model: nn.Module, config: dict[str, Any]) -> list[str]:
    """Linear modules of ``model`` that the config's ``target_modules`` names, as PEFT resolves them.

    A list matches name suffixes, a string is a regex matched against the full name, ``all-linear``
    every linear layer but the output head; ``exclude_modules``, ``layers_to_transform`` and
    ``modules_to_save`` narrow the set.
    """
    targets = config.get("target_modules")
    if not targets:
        return []
    saved = config.get("modules_to_save") or []
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or ".lora_" in name or ".base_layer" in name:
            continue
        if any(name == s or name.endswith("." + s) or f".{s}." in f".{name}." for s in saved):
            continue
        if targets == "all-linear" or targets == ["all-linear"]:
            hit = module is not output
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit and not _excluded(name, config):
            names.append(name)
    return names


def _excluded(name: str, config: dict[str, Any]) -> bool:
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return True
    if isinstance(exclude, list) and any(name == e or name.endswith("." + e) for e in exclude):
        return True
    layers = config.get("layers_to_transform")
    if layers is not None:
        layers = [layers] if isinstance(layers, int) else layers
        found = re.search(r"\.(\d+)\.", name)
        return found is None or int(found.group(1)) not in layers
    return False


def check_adapter_state(model: nn.Module, config: dict[str, Any], state: dict[str, torch.Tensor],
                        where: str) -> list[str]:
    """Refuse a partial or non-matching adapter before any layer is changed; return its module names.

    Args:
        model: the base model, not yet adapted.
        config: the ``adapter_config.json`` contents.
        state: the weights under tunelab's names (``<module>.lora_A.weight``, ``<module>.weight`` …).
        where: the adapter directory, for the message.

    Raises:
        ModelLoadError: "k of N adapter tensors matched", with example missing, misshapen and unknown keys.
    """
    bad = [k for k in state if any(f".{p}" in k for p in UNSUPPORTED_PARTS)]
    if bad:
        raise ModelLoadError(f"{where}: adapter holds tensors tunelab cannot load (LoRA on embeddings or biases), "
                             f"e.g. {bad[:3]}")
    in_file = {m.group("module") for k in state if (m := LORA_KEY.match(k))}
    modules = sorted(set(targeted_modules(model, config)) | in_file)
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = {}
    for name in modules:
        r, _ = module_rank_alpha(config, name)
        layer = linear.get(name)
        shapes = ((r, layer.in_features), (layer.out_features, r)) if layer is not None else (None, None)
        expected[f"{name}.lora_A.weight"], expected[f"{name}.lora_B.weight"] = shapes
    params = dict(model.named_parameters(remove_duplicate=False))
    for key in state:
        if not LORA_KEY.match(key) and ".lora_" not in key:  # modules_to_save: must be a model parameter
            expected[key] = tuple(params[key].shape) if key in params else None
    missing = [k for k in expected if k not in state]
    unknown = [k for k, shape in expected.items() if shape is None and k in state]
    misshapen = [f"{k} {tuple(state[k].shape)} (model needs {shape})" for k, shape in expected.items()
                 if shape is not None and k in state and tuple(state[k].shape) != shape]
    if missing or unknown or misshapen:
        matched = len(expected) - len(missing) - len(unknown) - len(misshapen)
        parts = [f"missing e.g. {missing[:3]}" if missing else "",
                 f"not in the model e.g. {unknown[:3]}" if unknown else "",
                 f"wrong shape e.g. {misshapen[:3]}" if misshapen else ""]
        raise ModelLoadError(f"{where}: {matched} of {len(expected)} adapter tensors matched; "
                             + "; ".join(p for p in parts if p) + ". The adapter does not fit this base model "
                             "(or is incomplete), so it is not loaded")
    return modules


def check_loaded_keys(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """After injection: every tensor of the file is a parameter of the model with the same shape.

    Raises:
        ModelLoadError: "k of N adapter tensors matched" with example keys.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    wrong = [k for k, v in state.items() if k not in params or tuple(params[k].shape) != tuple(v.shape)]
    if wrong:
        raise ModelLoadError(f"{where}: {len(state) - len(wrong)} of {len(state)} adapter tensors matched; "
                             f"no such parameter of that shape in the model e.g. {wrong[:3]}")


def check_savable(state: dict[str, torch.Tensor], layers: dict[str, Any]) -> None:
    """Refuse to write sharded, meta, empty or wrongly shaped adapter tensors.

    Args:
        state: tensors about to be written, by tunelab name.
        layers: the LoRA layers by module name (their ``r``, ``in_features``, ``out_features``).

    Raises:
        ValueError: a tensor is a ``DTensor`` shard (gather the full weights first, e.g. FSDP's
            ``full_weights()``), lives on the meta device, has no elements, or a LoRA factor does not
            have shape (r, in_features) / (out_features, r).
    """
    from torch.distributed.tensor import DTensor

    for key, tensor in state.items():
        if isinstance(tensor, DTensor):
            raise ValueError(f"adapter tensor {key} is a sharded DTensor (not gathered); gather the full "
                             "weights before saving")
        if tensor.is_meta or tensor.numel() == 0:
            raise ValueError(f"adapter tensor {key} is empty (shape {tuple(tensor.shape)}, device {tensor.device})")
    for name, layer in layers.items():
        want = {"lora_A": (layer.r, layer.in_features), "lora_B": (layer.out_features, layer.r)}
        for part, shape in want.items():
            got = tuple(state[f"{name}.{part}.weight"].shape)
            if got != shape:
                raise ValueError(f"adapter tensor {name}.{part}.weight has shape {got}, expected {shape} "
                                 f"(r={layer.r})")


def rank_alpha_patterns(layers: dict[str, Any]) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """The most common (r, alpha) and PEFT ``rank_pattern`` / ``alpha_pattern`` for the other modules.

    Pattern keys are full module names with dots escaped, so each matches only its own module.
    """
    r = Counter(layer.r for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(layer.alpha for layer in layers.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(n): layer.r for n, layer in layers.items() if layer.r != r}
    alpha_pattern = {re.escape(n): layer.alpha for n, layer in layers.items() if layer.alpha != alpha}
    return r, alpha, rank_pattern, alpha_pattern
