"""Atomic checkpoints holding the full training state, and resume.

A checkpoint directory ``<output_dir>/checkpoints/step-000123/`` holds:
  * ``trainable.safetensors``: the trainable parameters (adapters, or every weight for full FT),
  * ``optimizer.pt``, ``scheduler.pt``: their ``state_dict()``s,
  * ``rng.pt``: torch (CPU and CUDA) and Python RNG states,
  * ``state.json``: step, data position (micro-batches consumed), tunelab version,
  * ``config.yaml``: the resolved config.
It is written into a temporary sibling directory and renamed into place, so a crash never leaves
a half-written checkpoint and never touches older ones.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab import __version__
from tunelab.errors import TunelabError


@dataclass
class TrainState:
    """Where training is: ``step`` optimizer steps done, ``micro_batches`` consumed."""

    step: int = 0
    micro_batches: int = 0


def atomic_dir(target: Path) -> Path:
    """A fresh temp directory next to ``target``; pair with :func:`commit_dir`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))


def commit_dir(tmp: Path, target: Path) -> None:
    """Move a finished temp directory into place, replacing an older ``target`` only at the end."""
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def save_checkpoint(
    output_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, state: TrainState,
    config_yaml: str, keep_last: int,
) -> Path:
    """Write a checkpoint for ``state.step`` atomically and delete all but the newest ``keep_last``."""
    target = output_dir / "checkpoints" / f"step-{state.step:06d}"
    tmp = atomic_dir(target)
    try:
        trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**asdict(state), "tunelab_version": __version__}))
        (tmp / "config.yaml").write_text(config_yaml)
        commit_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").is_file())


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG from a checkpoint; returns its :class:`TrainState`.

    Raises:
        TunelabError: the checkpoint's trainable parameters do not match the model's.
    """
    weights = load_file(str(path / "trainable.safetensors"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        diff = sorted(set(weights) ^ trainable)[:3]
        raise TunelabError(f"checkpoint {path} does not match this model/config (e.g. {diff})")
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    data = json.loads((path / "state.json").read_text())
    return TrainState(step=data["step"], micro_batches=data["micro_batches"])
