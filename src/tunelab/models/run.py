"""A finished run directory: save it so anything can load it, and load it back.

Layout of ``output_dir``:
  * LoRA: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT layout);
    full/freeze: ``config.json`` + ``model.safetensors`` (plain transformers layout),
  * the tokenizer files (with the chat template used in training),
  * ``config.yaml`` (resolved config), ``tunelab.json`` (version, base model, method, results, and
    ``base_quantization`` when the adapter was trained on a quantized base, e.g. QLoRA's NF4),
  * ``metrics.jsonl``, ``loss_curve.png``, ``checkpoints/``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from tunelab import __version__
from tunelab.adapters.peft_format import load_adapter, save_adapter
from tunelab.errors import ModelLoadError
from tunelab.quant.nf4 import quantization_record, requantize_from_record
from tunelab.models.loading import load_model, load_tokenizer, resolve_model_path
from tunelab.models.stop_config import apply_stop_ids, describe_stop_ids, write_generation_config
from tunelab.training.outputs import atomic_dir

RUN_INFO = "tunelab.json"


def save_run(
    output_dir: Path, model: nn.Module, tokenizer: Any, *, method: str, base_model: str, config_yaml: str,
    results: dict[str, Any], task_type: str = "CAUSAL_LM", modules_to_save: list[str] = (),
    console: Any = None, state_dict: dict[str, Any] | None = None,
) -> None:
    """Write the final model and run files; each file is written aside and renamed into place.

    ``state_dict``: the full weights to save for a non-LoRA ``method`` when ``model`` holds FSDP shards
    (:func:`whole_state_dict`, gathered on every rank beforehand); None saves ``model.state_dict()``.

    A causal LM's stop ids (EOS + the template's end-of-turn tokens) go into ``generation_config.json``
    (and, for full weights, ``config.json``'s ``eos_token_id``); the line saying so is printed on
    ``console`` (a rich Console; default: stdout) and the ids are kept in ``tunelab.json``.
    """
    tmp = atomic_dir(output_dir / "final")
    stop_ids: list[int] = []
    try:
        base_path = resolve_model_path(base_model)
        causal = task_type == "CAUSAL_LM"
        if method == "lora":
            save_adapter(model, tmp, base_model_name_or_path=str(Path(base_path).resolve()) if Path(base_path).exists()
                         else base_path, task_type=task_type, modules_to_save=list(modules_to_save))
            if causal:
                stop_ids = write_generation_config(tmp, tokenizer, model)
        else:
            if causal:
                stop_ids = apply_stop_ids(model, tokenizer)
            model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / "config.yaml").write_text(config_yaml)
        info = {"tunelab_version": __version__, "method": method, "base_model": base_model,
                "base_model_path": base_path, "task_type": task_type, "stop_ids": stop_ids, "results": results}
        if method == "lora" and quantization_record(model):
            info["base_quantization"] = quantization_record(model)
        (tmp / RUN_INFO).write_text(json.dumps(info, indent=2))
        # the adapter config goes last but one (and an older one first), so no config sits beside weights
        # it does not describe; tunelab.json goes last: it marks the run finished (--resume checks it)
        (output_dir / "adapter_config.json").unlink(missing_ok=True)
        for item in sorted(tmp.iterdir(), key=lambda p: (p.name == RUN_INFO, p.name == "adapter_config.json")):
            os.replace(item, output_dir / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if stop_ids:
        log_stop_ids(console, output_dir, tokenizer, stop_ids)


def whole_state_dict(model: nn.Module) -> dict[str, Any] | None:
    """The whole ``state_dict`` of a model whose parameters may be FSDP2 ``DTensor`` shards.

    Collective when sharded: every rank calls it (outside ``Runtime.full_weights``); rank 0 gets the
    gathered tensors (on the CPU) without the aliases of tied weights, the other ranks an empty dict. A plain model (one process, DDP) gets
    None: :func:`save_run` then saves ``model.state_dict()`` as usual.
    """
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    whole = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # gathered copies no longer share storage, so drop the aliases of tied weights (e.g. lm_head.weight tied
    # to the embeddings) as save_pretrained does for the model's own shared tensors
    aliases = set(dict(model.named_parameters(remove_duplicate=False))) - set(dict(model.named_parameters()))
    return {k: v for k, v in whole.items() if k not in aliases}


def log_stop_ids(console: Any, where: Path, tokenizer: Any, stop_ids: list[int]) -> None:
    """Print which stop ids were written into ``where``'s ``generation_config.json``."""
    from rich.console import Console

    (console or Console()).print(f"[bold]stop ids[/] {where}/generation_config.json eos_token_id = "
                                 f"{describe_stop_ids(tokenizer, stop_ids)}", highlight=False)


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """``tunelab.json`` of a run, or a synthetic one for a plain HF/PEFT directory."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_INFO
    if path.is_file():
        return json.loads(path.read_text())
    if (run_dir / "adapter_config.json").is_file():
        config = json.loads((run_dir / "adapter_config.json").read_text())
        base = config.get("base_model_name_or_path")
        return {"method": "lora", "base_model": base, "base_model_path": base,
                "task_type": config.get("task_type") or "CAUSAL_LM"}
    if (run_dir / "config.json").is_file():
        return {"method": "full", "base_model": str(run_dir)}
    raise ModelLoadError(f"{run_dir} is not a tunelab run, a PEFT adapter or a model directory")


def saved_head_outputs(run_dir: Path) -> int:
    """Outputs of the classification head saved with a LoRA adapter (its ``modules_to_save``).

    The base model alone does not know them (transformers would build its default 2-label head),
    so they are read from the adapter file: the smallest first dimension among the saved head's 2-D
    weights (the output layer, also for two-layer heads such as RoBERTa's ``dense`` + ``out_proj``).

    Raises:
        ModelLoadError: the adapter saves no head weights.
    """
    from safetensors import safe_open

    config = json.loads((run_dir / "adapter_config.json").read_text())
    heads = tuple(f"base_model.model.{m}." for m in config.get("modules_to_save") or [])
    with safe_open(str(run_dir / "adapter_model.safetensors"), framework="pt") as f:
        rows = [f.get_slice(k).get_shape()[0] for k in f.keys()
                if k.startswith(heads) and k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2]
    if not rows:
        raise ModelLoadError(f"{run_dir}: a SEQ_CLS adapter without saved head weights (modules_to_save)")
    return min(rows)


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def has_tokenizer_files(directory: Path) -> bool:
    """Whether ``directory`` holds a tokenizer of its own (any file transformers loads one from)."""
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def label_maps(info: dict[str, Any]) -> dict[str, Any]:
    """``id2label`` / ``label2id`` of a classification run from its ``tunelab.json`` (empty if it has none)."""
    space = (info.get("results") or {}).get("label_space") or {}
    names = space.get("names")
    if not names:
        return {}
    return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}


def fit_embeddings(model: nn.Module, tokenizer: Any, run_dir: Path) -> None:
    """Resize the base model's embeddings to the run's tokenizer when training added tokens.

    A base whose embedding matrix already has room (vocabularies padded to a multiple of 64) is left
    as it is. The adapter's saved embedding/head rows (``modules_to_save``) must then fit.

    Raises:
        ModelLoadError: the adapter's saved embedding has a row count that is neither the model's nor
            the tokenizer's (one line naming both sizes).
    """
    rows = model.get_input_embeddings().weight.shape[0]
    saved = saved_embedding_rows(run_dir, model)
    want = saved if saved is not None else len(tokenizer)
    if saved is not None and saved < len(tokenizer):
        raise ModelLoadError(f"{run_dir}: the adapter's embedding has {saved} rows but its tokenizer has "
                             f"{len(tokenizer)} tokens; the run's files do not belong together")
    if want > rows or (saved is not None and saved != rows):
        model.resize_token_embeddings(want, mean_resizing=False)


def saved_embedding_rows(run_dir: Path, model: nn.Module) -> int | None:
    """Rows of the input-embedding weight saved in the adapter (``modules_to_save``), if any."""
    from safetensors import safe_open

    path = run_dir / "adapter_model.safetensors"
    names = {n for n, m in model.named_modules() if m is model.get_input_embeddings()}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            name = key.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            if name.removesuffix(".weight") in names:
                return f.get_slice(key).get_shape()[0]
    return None


def load_run(run_dir: str | Path, auto_class: Any = None, **kwargs: Any) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Model (base + adapter, or full weights), tokenizer and run info of a finished run.

    Without ``auto_class`` the run's own ``task_type`` picks it: ``SEQ_CLS`` (classifiers, reward
    models) loads ``AutoModelForSequenceClassification``, anything else a causal LM.
    """
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    if auto_class is None and info.get("task_type") == "SEQ_CLS":
        from transformers import AutoModelForSequenceClassification

        auto_class = AutoModelForSequenceClassification
    if info["method"] == "lora":
        # The recorded local path (e.g. a GGUF conversion cache) may not exist on this machine; the
        # base model's original reference (an alias or hub id) is resolved here instead.
        base = info.get("base_model_path")
        if not base or (Path(base).is_absolute() and not Path(base).exists()):
            base = info["base_model"]
        # a PEFT folder saved without tokenizer files is served with its base model's tokenizer
        tokenizer = load_tokenizer(str(run_dir) if has_tokenizer_files(run_dir) else base)
        if info.get("task_type") == "SEQ_CLS":
            if "num_labels" not in kwargs:
                kwargs["num_labels"] = saved_head_outputs(run_dir)
            for key, value in label_maps(info).items():
                kwargs.setdefault(key, value)
        model = load_model(base, auto_class, **kwargs)
        fit_embeddings(model, tokenizer, run_dir)
        if info.get("base_quantization"):  # the adapter was trained on this quantized base: rebuild it
            config = json.loads((run_dir / "adapter_config.json").read_text())
            requantize_from_record(model, info["base_quantization"], exclude=list(config.get("modules_to_save") or []))
        load_adapter(model, run_dir)
    else:
        tokenizer = load_tokenizer(str(run_dir))
        model = load_model(str(run_dir), auto_class, **kwargs)
    model.eval()
    return model, tokenizer, info
