"""GGUF weight types: which ones ``gguf`` writes in Python, and K-quants through llama.cpp.

* f32, f16, bf16 and the block types ``gguf.quants`` implements (q8_0, q5_0, q5_1, q4_0, q4_1) are
  written in-process. As llama.cpp's converter does, 1-D tensors (norms, biases) stay f32, and a
  2-D tensor whose rows are not a whole number of blocks falls back to f16.
* K-quants (q4_k_m, q5_k_m, q6_k, ...) have no Python quantizer: the model is written as f32 first,
  then ``llama_cpp.llama_model_quantize`` (llama.cpp's own quantizer, from the optional
  ``llama-cpp-python`` extra) produces the file, with llama.cpp's per-tensor type choices.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from tunelab.errors import TunelabError

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
# name -> (tensor type for 2-D weights, file type recorded in general.file_type)
PYTHON_QUANTS: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1), "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1), "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
}
# name -> llama.cpp's llama_ftype for llama_model_quantize
LLAMA_CPP_QUANTS: dict[str, gguf.LlamaFileType] = {
    "q2_k": F.MOSTLY_Q2_K, "q3_k_s": F.MOSTLY_Q3_K_S, "q3_k_m": F.MOSTLY_Q3_K_M, "q3_k_l": F.MOSTLY_Q3_K_L,
    "q4_k_s": F.MOSTLY_Q4_K_S, "q4_k_m": F.MOSTLY_Q4_K_M, "q5_k_s": F.MOSTLY_Q5_K_S, "q5_k_m": F.MOSTLY_Q5_K_M,
    "q6_k": F.MOSTLY_Q6_K,
}
ALL_QUANTS = (*PYTHON_QUANTS, *LLAMA_CPP_QUANTS)
LLAMA_EXTRA = 'pip install "tunelab[llama]" (llama-cpp-python==0.3.36)'


def check_quant(name: str) -> str:
    """The lower-cased quant name if known.

    Raises:
        TunelabError: unknown name (lists every type), or a K-quant without llama-cpp-python.
    """
    quant = name.lower()
    if quant not in ALL_QUANTS:
        raise TunelabError(f"unknown --quant '{name}'; choose one of: {', '.join(ALL_QUANTS)}")
    if quant in LLAMA_CPP_QUANTS:
        _llama_cpp()
    return quant


def encode(array: np.ndarray, quant: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """``array`` (float32) encoded as ``quant`` would store it; returns the bytes/array and its type."""
    wanted = PYTHON_QUANTS[quant][0]
    if array.ndim < 2 or wanted == Q.F32:
        return array.astype(np.float32), Q.F32
    if wanted == Q.F16:
        return array.astype(np.float16), Q.F16
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if array.shape[-1] % block:
        return array.astype(np.float16), Q.F16
    return gguf.quants.quantize(array.astype(np.float32), wanted), wanted


def llama_cpp_quantize(source: Path, target: Path, quant: str, threads: int = 0) -> None:
    """Quantize the GGUF ``source`` into ``target`` with llama.cpp (``llama_model_quantize``).

    Raises:
        TunelabError: llama-cpp-python missing, or llama.cpp reports a failure.
    """
    llama_cpp = _llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(LLAMA_CPP_QUANTS[quant])
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise TunelabError(f"llama.cpp could not quantize {source} to {quant} (status {status})")


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as err:
        raise TunelabError(f"K-quants are made by llama.cpp's quantizer, which needs the llama extra: "
                           f"{LLAMA_EXTRA}; or pick one of {', '.join(PYTHON_QUANTS)}") from err
    return llama_cpp
