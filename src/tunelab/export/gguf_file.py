"""Write a causal LM and its tokenizer as one GGUF file (llama.cpp, Ollama, LM Studio read it).

Written in-process with the ``gguf`` package: metadata (architecture hyperparameters, tokenizer,
chat template) and tensors named and laid out as llama.cpp's own converter writes them (see
:mod:`tunelab.export.architectures` and :mod:`tunelab.export.tokenizer_gguf`). K-quants go
through llama.cpp's quantizer (:mod:`tunelab.export.quant`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import gguf
import torch

from tunelab.export.architectures import arch_spec, gguf_tensors, write_hparams
from tunelab.export.quant import PYTHON_QUANTS, check_quant, encode, llama_cpp_quantize
from tunelab.export.tokenizer_gguf import GGUFVocab, tokenizer_to_gguf


def write_gguf(model: torch.nn.Module, tokenizer: Any, path: Path, quant: str = "f16", *, name: str = "model") -> None:
    """Write ``model`` (a transformers causal LM, adapters already merged) to ``path`` as ``quant``.

    ``path`` is written directly; callers that must not leave a partial file write to a temporary
    name and rename (the CLI does).

    Raises:
        TunelabError: unsupported architecture, tokenizer or quant (each names what is supported).
    """
    quant = check_quant(quant)
    spec = arch_spec(model.config)
    vocab = tokenizer_to_gguf(tokenizer, model.get_input_embeddings().weight.shape[0])
    if quant in PYTHON_QUANTS:
        _write(model, vocab, spec, path, quant, name)
        return
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-export-") as tmp:
        source = Path(tmp) / "f32.gguf"
        _write(model, vocab, spec, source, "f32", name)
        llama_cpp_quantize(source, path, quant, threads=os.cpu_count() or 1)


def _write(model: torch.nn.Module, vocab: GGUFVocab, spec: Any, path: Path, quant: str, name: str) -> None:
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[spec.arch])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(int(PYTHON_QUANTS[quant][1]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(writer, model.config, spec)
        write_vocab(writer, vocab)
        with torch.no_grad():
            for tensor_name, array in gguf_tensors(model, spec):
                data, qtype = encode(array, quant)
                writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def write_vocab(writer: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    """The ``tokenizer.*`` keys llama.cpp reads for a byte-level BPE vocabulary."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    ids = vocab.special_ids
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id),
                     ("eot", writer.add_eot_token_id)):
        if key in ids:
            add(ids[key])
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
