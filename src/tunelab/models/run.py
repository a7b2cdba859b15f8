"""A finished run directory: save it so anything can load it, and load it back.

Layout of ``output_dir``:
  * LoRA: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT layout);
    full/freeze: ``config.json`` + ``model.safetensors`` (plain transformers layout),
  * the tokenizer files (with the chat template used in training),
  * ``config.yaml`` (resolved config), ``tunelab.json`` (version, base model, method, results),
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
from tunelab.models.loading import load_model, load_tokenizer, resolve_model_path
from tunelab.training.outputs import atomic_dir

RUN_INFO = "tunelab.json"


def save_run(
    output_dir: Path, model: nn.Module, tokenizer: Any, *, method: str, base_model: str, config_yaml: str,
    results: dict[str, Any], task_type: str = "CAUSAL_LM", modules_to_save: list[str] = (),
) -> None:
    """Write the final model and run files; each file is written aside and renamed into place."""
    tmp = atomic_dir(output_dir / "final")
    try:
        base_path = resolve_model_path(base_model)
        if method == "lora":
            save_adapter(model, tmp, base_model_name_or_path=str(Path(base_path).resolve()) if Path(base_path).exists()
                         else base_path, task_type=task_type, modules_to_save=list(modules_to_save))
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "config.yaml").write_text(config_yaml)
        info = {"tunelab_version": __version__, "method": method, "base_model": base_model,
                "base_model_path": base_path, "task_type": task_type, "results": results}
        (tmp / RUN_INFO).write_text(json.dumps(info, indent=2))
        for item in sorted(tmp.iterdir(), key=lambda p: p.name == RUN_INFO):  # tunelab.json last: it marks
            os.replace(item, output_dir / item.name)                          # the run finished
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """``tunelab.json`` of a run, or a synthetic one for a plain HF/PEFT directory."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_INFO
    if path.is_file():
        return json.loads(path.read_text())
    if (run_dir / "adapter_config.json").is_file():
        base = json.loads((run_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return {"method": "lora", "base_model": base, "base_model_path": base}
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
    tokenizer = load_tokenizer(str(run_dir))
    if info["method"] == "lora":
        # The recorded local path (e.g. a GGUF conversion cache) may not exist on this machine; the
        # base model's original reference (an alias or hub id) is resolved here instead.
        base = info.get("base_model_path")
        if not base or (Path(base).is_absolute() and not Path(base).exists()):
            base = info["base_model"]
        if info.get("task_type") == "SEQ_CLS" and "num_labels" not in kwargs:
            kwargs["num_labels"] = saved_head_outputs(run_dir)
        model = load_model(base, auto_class, **kwargs)
        load_adapter(model, run_dir)
    else:
        model = load_model(str(run_dir), auto_class, **kwargs)
    model.eval()
    return model, tokenizer, info
