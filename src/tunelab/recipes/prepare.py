"""Steps every recipe shares before its loop: seeding, before-training results, trainable-parameter setup.

The output-directory checks live in :mod:`tunelab.training.outputs` (re-exported here for the recipes).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.adapters.lora import inject_lora
from tunelab.config.schema import Config
from tunelab.errors import TunelabError
from tunelab.models.lineage import record_or_check_start
from tunelab.quant.nf4 import quantize_frozen_linears
from tunelab.training.distributed import Runtime, env_world_size, init_distributed
from tunelab.training.outputs import BEFORE_TRAINING, RUN_MARKERS, atomic_file, check_output_dir  # noqa: F401


def seed_everything(seed: int, threads: int | None) -> None:
    """Seed Python and torch RNGs; set torch's CPU thread count if given."""
    random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)


def start_run(config: Config, resume: bool | str | None, overwrite: bool,
              console: Any = None) -> tuple[Runtime, Any, Path | None]:
    """What every recipe does first: join the run (one process, or a rank under torchrun), pick the
    console (quiet on ranks other than 0), check ``output_dir`` on rank 0 (taking the run lock there)
    and seed every RNG.

    Returns:
        ``(runtime, console, resume_from)``: the :class:`~tunelab.training.distributed.Runtime` (its
        ``device`` is the one to train on), the console, and the checkpoint to resume from (the same
        on every rank) or None.

    Raises:
        TunelabError: as :func:`tunelab.training.distributed.init_distributed` and
            :func:`tunelab.training.outputs.check_output_dir` (on rank 0).
        ModelLoadError: the run starts from an earlier run that is unusable, or (``--resume``) that
            changed since the run started (:func:`tunelab.models.lineage.record_or_check_start`).
    """
    runtime = init_distributed(config.distributed, config.train.precision)
    resume_from = runtime.from_main(check_output_dir, Path(config.output_dir), resume, overwrite)
    # stage chaining: the earlier run this one starts from must be the same one on --resume
    record_or_check_start(config.model.name_or_path, Path(config.output_dir), resume_from is not None,
                          write=runtime.is_main)
    seed_everything(config.train.seed, config.train.threads)
    return runtime, runtime.console(console), resume_from


def before_training(output_dir: Path, resume_from: Path | None, measure: Callable[[], dict[str, Any]], *,
                    write: bool = True) -> dict[str, Any]:
    """What a run measured before its first step (held-out metrics, sample answers, probe info).

    A fresh run calls ``measure()`` now and keeps its JSON-ready record in ``before_training.json``
    (written aside and renamed into place; ``write=False`` on non-main ranks). A resumed run does
    not measure again (its weights are no longer the starting ones): the record is read back, so
    the final ``tunelab.json`` still holds it; ``{}`` for a run from before this file existed.
    """
    path = output_dir / BEFORE_TRAINING
    if resume_from is not None:
        return json.loads(path.read_text()) if path.is_file() else {}
    record = measure()
    if write:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
    return record


def setup_trainable(model: nn.Module, config: Config, modules_to_save: list[str] = ()) -> list[str]:
    """Make the parameters ``train.method`` names trainable; returns LoRA-adapted module names.

    Also turns on activation checkpointing when ``train.gradient_checkpointing`` is set, so every
    recipe honours that key.

    Args:
        modules_to_save: with LoRA, modules trained in full and saved with the adapter (PEFT's
            ``modules_to_save``), e.g. a new classification head ``["score"]``.
    """
    names = _make_trainable(model, config, modules_to_save)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return names


def _make_trainable(model: nn.Module, config: Config, modules_to_save: list[str]) -> list[str]:
    method = config.train.method
    if method == "lora":
        lc = config.lora
        quantize_base(model, config.model.quantize, exclude=list(modules_to_save))
        names = inject_lora(model, lc.target_modules, lc.r, lc.alpha, lc.dropout, lc.use_rslora,
                            exclude=list(modules_to_save), use_dora=lc.use_dora)
        for module_name in modules_to_save:
            model.get_submodule(module_name).requires_grad_(True)
        upcast_trainable(model)
        return names
    if method == "freeze":
        model.requires_grad_(False)
        matched = [n for n, p in model.named_parameters() if any(s in n for s in config.train.trainable_modules)]
        if not matched:
            raise TunelabError(f"train.trainable_modules={config.train.trainable_modules} matches no parameter")
        for name, param in model.named_parameters():
            param.requires_grad_(name in matched)
    else:
        model.requires_grad_(True)
    return []


def quantize_base(model: nn.Module, quantize: str, exclude: list[str] = ()) -> list[str]:
    """Store the frozen base's linear layers as ``model.quantize`` says (before LoRA goes on top).

    Returns the quantized module names (none for ``quantize="none"``).

    Raises:
        TunelabError: several processes (not supported with a quantized base), or a device/shape the
            backend cannot handle (each naming ``model.quantize``).
    """
    if quantize == "none":
        return []
    if env_world_size() > 1:
        raise TunelabError(f"model.quantize={quantize} is not supported with several processes (ddp/fsdp); "
                           "train on one process or set model.quantize=none")
    return quantize_frozen_linears(model, exclude)


def weights_dtype(config: Config, device: torch.device) -> torch.dtype:
    """Dtype to load weights in (``model.dtype``; 'auto' = bf16 for a frozen LoRA base on CUDA).

    Raises:
        TunelabError: bf16 weights with ``train.precision: fp32`` (adapters would meet bf16 inputs
            without autocast; also ``auto`` off CUDA, which is fp32 there), or bf16 weights for full/freeze
            fine-tuning (no fp32 master copy).
    """
    choice = config.model.dtype
    if choice == "auto":
        choice = "bfloat16" if device.type == "cuda" and config.train.method == "lora" else "float32"
    if choice == "bfloat16":
        if config.train.method != "lora":
            raise TunelabError("model.dtype: bfloat16 is only for a frozen LoRA base; full/freeze training keeps "
                               "float32 master weights (use train.precision: bf16 for bf16 compute)")
        if config.train.precision == "fp32":
            raise TunelabError("model.dtype: bfloat16 needs train.precision auto or bf16 (autocast), not fp32")
        if config.train.precision == "auto" and device.type != "cuda":
            raise TunelabError(f"model.dtype: bfloat16 needs bf16 autocast, and train.precision: auto means fp32 on "
                               f"{device.type}: set train.precision: bf16 (the fast CPU path) or model.dtype: float32")
    return torch.bfloat16 if choice == "bfloat16" else torch.float32


def upcast_trainable(model: nn.Module) -> None:
    """Keep every trainable parameter in float32 (master weights for the optimizer)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def configure_attention_backends(config: Config) -> None:
    """Apply ``train.cudnn_sdpa`` (CUDA only; see bench/RESULTS.md for the measurement behind 'auto')."""
    if not torch.cuda.is_available():
        return
    choice = config.train.cudnn_sdpa
    enabled = choice == "on" or (choice == "auto" and config.train.method != "lora")
    torch.backends.cuda.enable_cudnn_sdp(enabled)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing: works with frozen inputs (LoRA) without hooks."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
