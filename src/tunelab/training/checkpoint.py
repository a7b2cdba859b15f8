"""Atomic checkpoints holding the full training state, and resume.

A checkpoint directory ``<output_dir>/checkpoints/step-000123/`` holds:
  * ``trainable.safetensors``: the trainable parameters (adapters, or every weight for full FT),
  * ``optimizer.pt``, ``scheduler.pt``: their ``state_dict()``s,
  * ``rng.pt``: torch (CPU and CUDA) and Python RNG states,
  * ``state.json``: step, data position (micro-batches consumed), tunelab version,
  * ``config.yaml``: the resolved config,
  * ``manifest.json``: every other file's size and SHA-256, written last (:mod:`tunelab.training.manifest`);
    ``--resume`` checks it and skips a damaged checkpoint (:mod:`tunelab.training.resume`).
It is written into a temporary sibling directory and renamed into place, so a crash never leaves
a half-written checkpoint and never touches older ones.

Runs with several processes (DDP/FSDP, see :mod:`tunelab.training.distributed`) write the weights
and optimizer state as a ``torch.distributed.checkpoint`` (DCP) directory instead: ``.metadata`` +
``__<rank>_0.distcp`` shards keyed by parameter name (FSDP ranks each write their own shards, DDP's
replicated tensors are written once), ``rng-rank<r>.pt`` per rank, and the same ``scheduler.pt``,
``state.json`` and ``config.yaml`` (rank 0). DCP reshards on load, so such a checkpoint resumes on
any number of ranks, with either strategy, or on one plain process. Every rank writes into the same
temporary directory (``output_dir`` must be on a filesystem all nodes share) and rank 0 renames it
into place once all ranks are done.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab import __version__
from tunelab.errors import TunelabError
from tunelab.training.manifest import write_manifest
from tunelab.training.outputs import atomic_dir, commit_dir  # noqa: F401  (the one place that writes)

if TYPE_CHECKING:
    from tunelab.training.distributed import Runtime

DCP_METADATA = ".metadata"


@dataclass
class TrainState:
    """Where training is: ``step`` optimizer steps done, ``micro_batches`` consumed (over all ranks).

    ``micro_batch_size`` (sequences or packed rows per micro-batch) gives the data position its unit;
    ``micro_batches_per_step`` is ``grad_accum × world_size``. Both are None in older checkpoints.
    With ``train.metric_for_best`` (:mod:`tunelab.training.selection`): ``best_step`` and ``best_value``
    of the best evaluation so far (its checkpoint is never pruned), ``evals_since_best`` for early
    stopping, and ``stopped_early`` once it stopped the run. ``data_sha256`` and
    ``micro_batches_per_epoch`` describe the training data, checked on resume.
    """

    step: int = 0
    micro_batches: int = 0
    micro_batch_size: int | None = None
    micro_batches_per_step: int | None = None
    best_step: int | None = None
    best_value: float | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    data_sha256: str | None = None  # the training data (epoch 0's micro-batches; training/loop.check_same_data)
    micro_batches_per_epoch: int | None = None


def save_checkpoint(
    output_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, state: TrainState,
    config_yaml: str, keep_last: int, *, runtime: Runtime | None = None, extra: dict | None = None,
) -> Path:
    """Write a checkpoint for ``state.step`` atomically and delete all but the newest ``keep_last``
    (and the best, ``state.best_step``, which is never deleted).

    ``extra``: more loop state to keep (the RL loops' mini-batch generator, KL controller, score
    statistics), saved as ``extra.pt`` and read back by :func:`load_extra`; under a distributed
    ``runtime`` it must be the same on every rank (rank 0's is written).

    With a distributed ``runtime`` this is collective (every rank calls it) and writes the DCP
    layout; ``model`` is the unwrapped model (its parameters may be FSDP ``DTensor`` shards).
    """
    target = checkpoint_dir(output_dir, state.step)
    if runtime is not None and runtime.is_distributed:
        _save_sharded(target, model, optimizer, scheduler, state, config_yaml, runtime, extra)
        if runtime.is_main:
            _prune(output_dir, keep_last, state.best_step)
        runtime.barrier()
        return target
    tmp = atomic_dir(target)
    try:
        trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        if extra is not None:
            torch.save(extra, tmp / "extra.pt")
        _write_run_files(tmp, scheduler, state, config_yaml, world_size=1)
        write_manifest(tmp)
        commit_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _prune(output_dir, keep_last, state.best_step)
    return target


def _save_sharded(target: Path, model, optimizer, scheduler, state: TrainState, config_yaml: str,
                  runtime: Runtime, extra: dict | None = None) -> None:
    import torch.distributed.checkpoint as dcp

    tmp = Path(runtime.broadcast(str(atomic_dir(target)) if runtime.is_main else None))
    try:
        model_state, optim_state = _state_dicts(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
        torch.save(_rng_state(), tmp / f"rng-rank{runtime.rank:05d}.pt")
        runtime.barrier()
        if runtime.is_main:
            _write_run_files(tmp, scheduler, state, config_yaml, world_size=runtime.world_size)
            if extra is not None:
                torch.save(extra, tmp / "extra.pt")
            write_manifest(tmp)  # after the barrier: every rank's shards are in tmp
            commit_dir(tmp, target)
    finally:
        if runtime.is_main:
            shutil.rmtree(tmp, ignore_errors=True)


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Trainable weights and optimizer state keyed by parameter name, as DCP saves and loads them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def _rng_state() -> dict:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _write_run_files(directory: Path, scheduler, state: TrainState, config_yaml: str, world_size: int) -> None:
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    info = {**asdict(state), "world_size": world_size, "tunelab_version": __version__}
    (directory / "state.json").write_text(json.dumps(info))
    (directory / "config.yaml").write_text(config_yaml)


def run_finished(output_dir: Path, step: int) -> bool:
    """Whether ``output_dir`` holds the final files of a run that ended at ``step``: its ``tunelab.json``
    (written last by :func:`tunelab.models.run.save_run`) records ``results.steps == step``. False for a
    run killed after its last checkpoint but before (or while) writing its model and report."""
    try:
        return json.loads((output_dir / "tunelab.json").read_text())["results"]["steps"] == step
    except (OSError, ValueError, KeyError, TypeError):
        return False


def clear_previous_run(output_dir: Path) -> None:
    """A fresh run replacing an old one (``--overwrite``), called once its setup succeeded.

    The old run's completion marker ``tunelab.json`` goes first: a run killed after its last checkpoint
    but before its final save is then an unfinished run (``--resume`` finishes it; it is refused as
    another run's base), never the old run's model and report posing as the new run's. Then the old
    checkpoints (:func:`clear_checkpoints`) and tracker directories
    (:func:`tunelab.training.trackers.remove_tracker_dirs`). The old model files stay until the new
    final save replaces them.
    """
    from tunelab.training.trackers import remove_tracker_dirs

    (output_dir / "tunelab.json").unlink(missing_ok=True)
    clear_checkpoints(output_dir)
    remove_tracker_dirs(output_dir)


def clear_checkpoints(output_dir: Path) -> int:
    """Remove every checkpoint (and half-written ``.tmp-``/``.old-`` leftovers of killed writes) under
    ``output_dir/checkpoints``; returns how many checkpoints were removed. Used when a fresh run
    replaces an old one (``--overwrite``)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return 0
    old = list_checkpoints(output_dir)
    for path in old + [p for p in root.iterdir() if p.name.startswith((".tmp-", ".old-", "damaged-"))]:
        shutil.rmtree(path, ignore_errors=True)
    return len(old)


def _prune(output_dir: Path, keep_last: int, best_step: int | None = None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, never the one of ``best_step``."""
    for old in list_checkpoints(output_dir)[:-keep_last]:
        if checkpoint_step(old) != best_step:
            shutil.rmtree(old, ignore_errors=True)


def checkpoint_step(path: Path) -> int | None:
    """The optimizer step a ``step-<N>`` checkpoint directory holds (any number of digits), else None."""
    prefix, _, digits = path.name.partition("-")
    return int(digits) if prefix == "step" and digits.isdigit() else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first: ordered by their step number, not by name, so
    ``step-1000000`` comes after ``step-999999`` (names are zero-padded to 6 digits only)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if checkpoint_step(p) is not None and (p / "state.json").is_file()]
    return sorted(found, key=checkpoint_step)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, *, runtime: Runtime | None = None,
) -> TrainState:
    """Restore weights, optimizer, scheduler and RNG from a checkpoint; returns its :class:`TrainState`.

    A sharded (DCP) checkpoint loads on any number of ranks and on one plain process (collective
    when distributed); a one-process checkpoint loads on one plain process only.

    Raises:
        TunelabError: the checkpoint's trainable parameters do not match the model's, or a
            one-process checkpoint is resumed by several processes.
    """
    if (path / DCP_METADATA).is_file():
        return _load_sharded(path, model, optimizer, scheduler, 0 if runtime is None else runtime.rank)
    if runtime is not None and runtime.is_distributed:
        raise TunelabError(f"checkpoint {path} was written by a one-process run; resume it on one process "
                           "(distributed.strategy=none), or start the distributed run afresh")
    weights = load_file(str(path / "trainable.safetensors"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        diff = sorted(set(weights) ^ trainable)[:3]
        raise TunelabError(f"checkpoint {path} does not match this model/config (e.g. {diff})")
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return _read_state(path)


def load_extra(path: Path) -> dict:
    """The ``extra`` loop state :func:`save_checkpoint` kept in checkpoint ``path`` (``{}`` if none)."""
    return torch.load(path / "extra.pt", weights_only=False) if (path / "extra.pt").is_file() else {}


def _load_sharded(path: Path, model, optimizer, scheduler, rank: int) -> TrainState:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_state, optim_state = _state_dicts(model, optimizer)
    saved = {k[len("model."):] for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
             if k.startswith("model.")}
    if saved != set(model_state):
        diff = sorted(saved ^ set(model_state))[:3]
        raise TunelabError(f"checkpoint {path} does not match this model/config (e.g. {diff})")
    dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # keys checked above
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    own = path / f"rng-rank{rank:05d}.pt"
    _set_rng_state(torch.load(own if own.is_file() else path / "rng-rank00000.pt", weights_only=False))
    return _read_state(path)


def saved_world_size(path: Path) -> int:
    """How many processes wrote the checkpoint at ``path`` (``state.json``; 1 in older checkpoints)."""
    return int(json.loads((path / "state.json").read_text()).get("world_size", 1))


def _read_state(path: Path) -> TrainState:
    data = json.loads((path / "state.json").read_text())
    known = {f.name for f in fields(TrainState)}
    return TrainState(**{k: v for k, v in data.items() if k in known})


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    """Where the checkpoint of optimizer ``step`` lives."""
    return output_dir / "checkpoints" / f"step-{step:06d}"


def load_trainable_weights(path: Path, model: nn.Module) -> None:
    """Load only the trainable weights of the checkpoint at ``path`` into ``model`` (e.g. the best one at
    the end of a run); optimizer, scheduler and RNG are untouched. Collective for a sharded checkpoint
    under a distributed run."""
    if (path / DCP_METADATA).is_file():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, set_model_state_dict,
        )

        options = StateDictOptions(ignore_frozen_params=True)
        state = get_model_state_dict(model, options=options)
        dcp.load({"model": state}, checkpoint_id=path)
        set_model_state_dict(model, state, options=StateDictOptions(ignore_frozen_params=True, strict=False))
        return
    model.load_state_dict(load_file(str(path / "trainable.safetensors")), strict=False)
