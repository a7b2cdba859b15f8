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

import torch
from torch import nn

from tunelab import __version__
from tunelab.adapters.lora import merge_lora
from tunelab.adapters.peft_format import load_adapter, save_adapter
from tunelab.errors import ModelLoadError
from tunelab.quant.nf4 import quantization_record, requantize_from_record
from tunelab.models.lineage import RUN_INFO, check_lineage, read_run_info, run_directory  # noqa: F401 (re-exported)
from tunelab.models.loading import load_model, load_tokenizer, resolve_model_path
from tunelab.models.stop_config import apply_stop_ids, describe_stop_ids, write_generation_config
from tunelab.training.outputs import atomic_dir



def save_run(
    output_dir: Path, model: nn.Module, tokenizer: Any, *, method: str, base_model: str, config_yaml: str,
    results: dict[str, Any], task_type: str = "CAUSAL_LM", modules_to_save: list[str] = (),
    console: Any = None, state_dict: dict[str, Any] | None = None, lineage: list[dict[str, Any]] = (),
) -> None:
    """Write the final model and run files; each file is written aside and renamed into place.

    ``state_dict``: the full weights to save for a non-LoRA ``method`` when ``model`` holds FSDP shards
    (:func:`whole_state_dict`, gathered on every rank beforehand); None saves ``model.state_dict()``.

    ``lineage`` (:func:`tunelab.models.lineage.start_lineage`) lists the earlier runs the model started
    from; it is kept in ``tunelab.json`` with the run's ``task`` (read from ``config_yaml``).

    A causal LM's stop ids (EOS + the template's end-of-turn tokens) go into ``generation_config.json``
    (and, for full weights, ``config.json``'s ``eos_token_id``); the line saying so is printed on
    ``console`` (a rich Console; default: stdout) and the ids are kept in ``tunelab.json``.
    """
    tmp = atomic_dir(output_dir / "final")
    stop_ids: list[int] = []
    try:
        base_path = resolve_model_path(base_model)
        if Path(base_path).exists():  # a local base (an earlier run): absolute, so it loads from any directory
            base_path = str(Path(base_path).resolve())
        causal = task_type == "CAUSAL_LM"
        if method == "lora":
            save_adapter(model, tmp, base_model_name_or_path=base_path, task_type=task_type, modules_to_save=list(modules_to_save))
            if causal:
                stop_ids = write_generation_config(tmp, tokenizer, model)
        else:
            if causal:
                stop_ids = apply_stop_ids(model, tokenizer)
            model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / "config.yaml").write_text(config_yaml)
        info = {"tunelab_version": __version__, "task": _task(config_yaml), "method": method, "base_model": base_model,
                "base_model_path": base_path, "task_type": task_type, "stop_ids": stop_ids, "results": results,
                "lineage": list(lineage)}
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


def _task(config_yaml: str) -> str | None:
    import yaml

    loaded = yaml.safe_load(config_yaml) if config_yaml else None
    return loaded.get("task") if isinstance(loaded, dict) else None


def log_stop_ids(console: Any, where: Path, tokenizer: Any, stop_ids: list[int]) -> None:
    """Print which stop ids were written into ``where``'s ``generation_config.json``."""
    from rich.console import Console

    (console or Console()).print(f"[bold]stop ids[/] {where}/generation_config.json eos_token_id = "
                                 f"{describe_stop_ids(tokenizer, stop_ids)}", highlight=False)


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


def base_reference(info: dict[str, Any]) -> str:
    """The base model of a LoRA run: its recorded local path, or its original reference (an alias or hub
    id) where that path does not exist on this machine (e.g. a GGUF conversion cache)."""
    base = info.get("base_model_path")
    lineage = info.get("lineage") or []
    if base and not Path(base).is_absolute() and lineage:
        # a run from before base paths were stored absolute: its direct base run's recorded (absolute) dir,
        # not whatever that relative path means in the current directory
        return lineage[-1]["output_dir"]
    if not base or (Path(base).is_absolute() and not Path(base).exists()):
        base = info["base_model"]
    return base


def config_reference(reference: str) -> str:
    """Where ``reference``'s ``config.json`` lives: an earlier LoRA run's (recursively) base, else itself.

    Raises:
        ModelLoadError: a checkpoint or unfinished run (:func:`tunelab.models.lineage.run_directory`).
    """
    run_dir = run_directory(reference)
    if run_dir is not None and read_run_info(run_dir)["method"] == "lora":
        return config_reference(base_reference(read_run_info(run_dir)))
    return str(reference)


def load_start_tokenizer(reference: str, **kwargs: Any) -> Any:
    """The tokenizer a run starting from ``reference`` uses: an earlier run's own (added tokens and chat
    template included), that of its base where the run folder has none (a bare PEFT adapter), else
    :func:`tunelab.models.loading.load_tokenizer`'s."""
    run_dir = run_directory(reference)
    if run_dir is not None and not has_tokenizer_files(run_dir):
        return load_start_tokenizer(base_reference(read_run_info(run_dir)), **kwargs)
    return load_tokenizer(str(reference), **kwargs)


def load_weights(reference: str, auto_class: Any = None, **kwargs: Any) -> Any:
    """Load ``reference`` as plain weights, following earlier runs (stage chaining, :mod:`tunelab.models.lineage`).

    A finished full/freeze run loads its own weights; a LoRA run (or PEFT folder) loads its base (again
    through this function, so a chain of runs resolves recursively), its adapter on top (a QLoRA
    adapter on the NF4 base rebuilt from its record) and merges it: the result is a plain model whose
    logits equal the earlier run's. Anything else goes to :func:`tunelab.models.loading.load_model`.
    The merge runs in float32; the model is then cast to ``dtype``.

    Args:
        auto_class, kwargs: as for :func:`tunelab.models.loading.load_model` (``output_loading_info``
            returns the innermost load's info: the keys missing from the first base).

    Raises:
        ModelLoadError: a checkpoint, an unfinished run, a base run changed since the adapter was
            trained, or anything ``load_model`` refuses.
    """
    run_dir = run_directory(reference)
    if run_dir is None:
        return load_model(str(reference), auto_class, **kwargs)
    info = read_run_info(run_dir)
    if info["method"] != "lora":
        return load_model(str(run_dir), auto_class, **kwargs)
    want_info = kwargs.pop("output_loading_info", False)
    dtype = kwargs.pop("dtype", torch.float32)
    model, tokenizer = _adapter_run(run_dir, info, auto_class, output_loading_info=want_info, **kwargs)
    loading = None
    if want_info:
        model, loading = model
    merge_lora(model)
    model.to(dtype)
    return (model, loading) if want_info else model


def _adapter_run(run_dir: Path, info: dict[str, Any], auto_class: Any, **kwargs: Any) -> tuple[Any, Any]:
    """Base (via :func:`load_weights`) + the run's adapter, unmerged, and the run's tokenizer."""
    base = base_reference(info)
    base_dir = run_directory(base)
    if base_dir is not None:
        check_lineage(run_dir, info, base_dir)
    # a PEFT folder saved without tokenizer files is served with its base model's tokenizer
    tokenizer = load_start_tokenizer(str(run_dir) if has_tokenizer_files(run_dir) else base)
    loaded = load_weights(base, auto_class, **kwargs)
    model = loaded[0] if kwargs.get("output_loading_info") else loaded
    fit_embeddings(model, tokenizer, run_dir)
    if info.get("base_quantization"):  # the adapter was trained on this quantized base: rebuild it
        config = json.loads((run_dir / "adapter_config.json").read_text())
        requantize_from_record(model, info["base_quantization"], exclude=list(config.get("modules_to_save") or []))
    load_adapter(model, run_dir)
    return loaded, tokenizer


def load_run(run_dir: str | Path, auto_class: Any = None, **kwargs: Any) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Model (base + adapter, or full weights), tokenizer and run info of a finished run.

    Without ``auto_class`` the run's own ``task_type`` picks it: ``SEQ_CLS`` (classifiers, reward
    models) loads ``AutoModelForSequenceClassification``, anything else a causal LM. A LoRA run whose
    base is an earlier run gets that base through :func:`load_weights` (merged, recursively).
    """
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    if auto_class is None and info.get("task_type") == "SEQ_CLS":
        from transformers import AutoModelForSequenceClassification

        auto_class = AutoModelForSequenceClassification
    if info["method"] == "lora":
        if info.get("task_type") == "SEQ_CLS":
            if "num_labels" not in kwargs:
                kwargs["num_labels"] = saved_head_outputs(run_dir)
            for key, value in label_maps(info).items():
                kwargs.setdefault(key, value)
        model, tokenizer = _adapter_run(run_dir, info, auto_class, **kwargs)
    else:
        tokenizer = load_tokenizer(str(run_dir))
        model = load_model(str(run_dir), auto_class, **kwargs)
    model.eval()
    return model, tokenizer, info
