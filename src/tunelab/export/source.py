"""What gets exported: a finished run (LoRA merged in memory), a merged or HF model directory, or an alias.

The run directory is only read: a LoRA adapter is merged into the loaded base model, never saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tunelab.adapters.lora import merge_lora
from tunelab.errors import TunelabError
from tunelab.models.loading import load_model, load_tokenizer
from tunelab.models.run import load_run, read_run_info


@dataclass
class ExportSource:
    """A causal LM ready to write (adapters merged), its tokenizer, and what the run recorded.

    ``system_prompt`` is the ``data.system_prompt`` the run trained with (None if none or not a run).
    """

    model: Any
    tokenizer: Any
    name: str
    method: str
    system_prompt: str | None = None


def load_export_source(reference: str | Path) -> ExportSource:
    """Load a run directory, a PEFT adapter / HF model directory, or any model reference tunelab loads.

    Raises:
        TunelabError: a classification/reward run (not a causal LM), or anything ``load_run`` /
            ``load_model`` refuses.
    """
    path = Path(reference)
    if path.is_dir():
        info = read_run_info(path)
        if info.get("task_type") == "SEQ_CLS":
            raise TunelabError(f"{path} is a classification or reward-model run; GGUF export writes causal LMs")
        model, tokenizer, info = load_run(path)
        merge_lora(model)
        return ExportSource(model, tokenizer, path.resolve().name, info["method"], _system_prompt(path))
    model = load_model(str(reference))
    model.eval()
    return ExportSource(model, load_tokenizer(str(reference)), Path(str(reference)).stem, "full")


def load_lora_run(run_dir: str | Path) -> tuple[Any, str]:
    """The base model with the run's LoRA layers injected and unmerged, and the run's name.

    Raises:
        TunelabError: not a LoRA run, or a run that also saves whole modules (``modules_to_save``),
            which a LoRA GGUF cannot carry.
    """
    path = Path(run_dir)
    info = read_run_info(path) if path.is_dir() else {"method": "not a run directory"}
    if info["method"] != "lora":
        raise TunelabError(f"{run_dir} is not a LoRA run ({info['method']}); --adapter exports LoRA adapters only")
    config = yaml.safe_load((path / "adapter_config.json").read_text()) or {}
    if config.get("modules_to_save"):
        raise TunelabError(f"{run_dir} also saves whole modules {config['modules_to_save']}; a LoRA GGUF holds "
                           "only low-rank updates: export the merged model instead")
    model, _, _ = load_run(path)
    return model, path.resolve().name


def _system_prompt(run_dir: Path) -> str | None:
    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    return data.get("system_prompt")
