"""LoRA: low-rank adapters on linear layers (Hu et al. 2021, arXiv:2106.09685, Eq. 3).

``y = W x + (alpha / r) · B A x`` with ``A`` (r × in) initialized Kaiming-uniform and ``B``
(out × r) initialized to zero, so the adapted model equals the base model at step 0. rsLoRA
(Kalajdzievski 2023, arXiv:2312.03732) scales by ``alpha / sqrt(r)`` instead. With ``use_dora`` the
layer is DoRA's weight-decomposed form (arXiv:2402.09353, see :mod:`tunelab.adapters.dora`).

Module layout mirrors PEFT's so state-dict keys map one-to-one: the wrapped layer keeps its
name and holds ``base_layer``, ``lora_A``, ``lora_B`` (and ``lora_magnitude_vector`` for DoRA).
A quantized base (:class:`tunelab.quant.nf4.NF4Linear`) is read through its ``dense_weight()``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tunelab.adapters import dora
from tunelab.errors import ConfigError


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    Args:
        base_layer: the pre-trained linear layer (its parameters are frozen).
        r: rank.
        alpha: scaling numerator.
        dropout: dropout probability on the LoRA input; 0 adds no op to the forward.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        use_dora: DoRA: add a trainable float32 magnitude per output feature,
            ``lora_magnitude_vector`` (out_features,), initialized to the base weight's row norms.

    Shapes: input (..., in_features) → output (..., out_features), same dtype as the input.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 use_dora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = dropout
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.merged = False
        self.disabled = False
        base_layer.requires_grad_(False)
        self.use_dora = use_dora
        self._dora_factor: torch.Tensor | None = None  # f = m / ||W + ΔW||_c of the last merge
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(dora.row_norm(self.base_weight().detach()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W x + b + B (s · A x)``: the scaling is applied to the rank-r intermediate (N × r), not
        the output (N × out_features); no dropout op at all when dropout is 0; no dtype casts under
        autocast (the matmuls take the autocast dtype); outside autocast a bf16 input meets the fp32
        adapter by a cast to fp32 and back."""
        out = self.base_layer(x)
        if self.merged or self.disabled:
            return out
        dropped = bool(self.dropout and self.training)
        if dropped:
            x = F.dropout(x, self.dropout, training=True)
        if x.dtype != self.lora_A.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            # a bf16 base outside autocast (e.g. generating sample answers): run the fp32 adapter in fp32
            return out + self._adapter_output(x.to(self.lora_A.weight.dtype), out.float(), dropped).to(out.dtype)
        return out + self._adapter_output(x, out, dropped)

    def _adapter_output(self, x: torch.Tensor, out: torch.Tensor, dropped: bool) -> torch.Tensor:
        if self.use_dora:
            bias = self.base_layer.bias
            base_out = None if dropped else (out if bias is None else out - bias.to(out.dtype))
            return dora.dora_extra_output(x, base_out, self.base_weight(), self.lora_A.weight,
                                          self.lora_B.weight, self.scaling, self.lora_magnitude_vector)
        return F.linear(F.linear(x, self.lora_A.weight) * self.scaling, self.lora_B.weight)

    def base_weight(self) -> torch.Tensor:
        """The base weight (out_features, in_features) as a dense tensor (dequantized if quantized)."""
        base = self.base_layer
        return base.dense_weight() if hasattr(base, "dense_weight") else base.weight

    def delta_weight(self) -> torch.Tensor:
        """The update ``scaling · B A`` as an (out_features, in_features) matrix."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (forward then skips the LoRA branch).

        LoRA: ``W += s · B A``. DoRA: ``W = m ⊙ (W + s·BA) / ||W + s·BA||_c`` (Eq. 5), remembering the
        per-row factor so :meth:`unmerge` can invert it.

        Raises:
            TypeError: the base is stored quantized (dequantize it first, as :func:`merge_lora` does).
        """
        if self.merged:
            return
        weight = self._dense_weight_param()
        if self.use_dora:
            merged, self._dora_factor = dora.merged_weight(weight, self.delta_weight(), self.lora_magnitude_vector)
            weight.copy_(merged.to(weight.dtype))
        else:
            weight += self.delta_weight().to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of the base weight again (DoRA: ``W = W' / f - s·BA``)."""
        if not self.merged:
            return
        weight = self._dense_weight_param()
        if self.use_dora:
            weight.copy_(dora.unmerged_weight(weight, self.delta_weight(), self._dora_factor).to(weight.dtype))
            self._dora_factor = None
        else:
            weight -= self.delta_weight().to(weight.dtype)
        self.merged = False

    def _dense_weight_param(self) -> torch.Tensor:
        if hasattr(self.base_layer, "dense_weight"):
            raise TypeError("cannot merge into a quantized base layer in place; dequantize it first (merge_lora does)")
        return self.base_layer.weight

    def extra_repr(self) -> str:  # noqa: D102
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}" + (", dora" if self.use_dora else "")


def find_target_modules(model: nn.Module, target_modules: list[str] | str, exclude: list[str] = ()) -> list[str]:
    """Names of the ``nn.Linear`` modules to adapt.

    Args:
        target_modules: ``"all-linear"`` (every linear layer except the output head, as in PEFT),
            or name suffixes (``q_proj`` matches ``model.layers.0.self_attn.q_proj``), or regexes
            prefixed with ``re:`` matched against the full name. The output head is adapted only when
            named (``lm_head``); see :func:`merge_lora` for a head tied to the input embeddings.
        exclude: module names (and their children) never adapted, e.g. a head in ``modules_to_save``.

    Raises:
        ConfigError: an entry of ``target_modules`` matches no adaptable linear layer (a typo next to a
            correct name would otherwise silently adapt fewer layers); the message names the entries
            and lists the model's linear-module names.
    """
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (module is output and target_modules == "all-linear"):
            continue
        if ".lora_A" in name or ".lora_B" in name or any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        if target_modules == "all-linear" or any(_matches(name, t) for t in target_modules):
            names.append(name)
    unmatched = [] if target_modules == "all-linear" else [
        t for t in target_modules if not any(_matches(name, t) for name in names)]
    if not names or unmatched:
        which = f"{unmatched!r} in " if names else ""
        raise ConfigError(f"{which}lora.target_modules={target_modules!r} matches no linear layer of the model; "
                          f"its linear-module names are {linear_module_names(model)}")
    return names


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the model's ``nn.Linear`` modules (``q_proj``, ``lm_head`` …), sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and ".lora_" not in name and not name.endswith("base_layer")})


def inject_lora(
    model: nn.Module, target_modules: list[str] | str, r: int, alpha: float, dropout: float = 0.0,
    use_rslora: bool = False, exclude: list[str] = (), use_dora: bool = False,
) -> list[str]:
    """Replace the target linear layers with :class:`LoRALinear` in place and freeze everything else.

    Returns:
        The adapted module names (PEFT's key prefix without ``base_model.model.``).
    """
    names = find_target_modules(model, target_modules, exclude)
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout, use_rslora, use_dora))
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """All LoRA layers of a model with their module names."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def merge_lora(model: nn.Module, unload: bool = True) -> nn.Module:
    """Merge every adapter into its base weight; with ``unload`` put the plain linears back.

    An adapted output head whose weight is tied to the input embeddings is untied first (its own
    copy of the weight, ``config.tie_word_embeddings = False``), so the merge changes the head and
    not the embeddings, and the saved model reloads exactly.

    A quantized base layer (one with ``dequantize()``, e.g. NF4) is first replaced by its
    dequantized ``nn.Linear``, the weight the adapter was trained against, and the update is merged
    into that; with ``unload`` the quantized layers without an adapter are dequantized too, so the
    result is a plain model that ``save_pretrained`` writes.
    """
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, layer in list(lora_layers(model)):
        if hasattr(layer.base_layer, "dequantize"):
            layer.base_layer = layer.base_layer.dequantize()
        if embeddings is not None and layer.base_layer.weight is embeddings.weight:
            layer.base_layer.weight = nn.Parameter(embeddings.weight.detach().clone(),
                                                   requires_grad=embeddings.weight.requires_grad)
            _untie_config(model)
        layer.merge()
        if unload:
            _replace(model, name, layer.base_layer)
    if unload:
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and hasattr(module, "dequantize"):
                _replace(model, name, module.dequantize())
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _untie_config(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    for part in (config, getattr(config, "get_text_config", lambda: None)()):
        if part is not None and hasattr(part, "tie_word_embeddings"):
            part.tie_word_embeddings = False


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model as its base model (adapters skipped), e.g. as the DPO/PPO reference."""
    layers = [layer for _, layer in lora_layers(model)]
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)
