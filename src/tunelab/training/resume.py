"""What ``--resume`` checks before it trusts a checkpoint and a config.

* :func:`resume_checkpoint` picks the newest *intact* checkpoint of a run (its manifest, see
  :mod:`tunelab.training.manifest`, matches its files), after cleaning up what killed writes left
  behind; a damaged newer checkpoint is named with what is wrong with it.
* :func:`config_changes` compares the resumed run's config with the one the checkpoint was trained
  with: keys in :data:`MAY_CHANGE` take effect (learning rate and schedule length, evaluation, saving,
  logging, how the maths is run); every other difference (model, method, LoRA shape, batch size, data,
  task, loss, seed, optimizer settings, ...) would make the resumed run a different run and is refused.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import TunelabError
from tunelab.training.manifest import manifest_problems

# Dotted config keys (or section prefixes ending in ".") a resumed run may change. train.grad_accum may
# change with the number of ranks (the loop warns when the global batch changes).
MAY_CHANGE: tuple[str, ...] = (
    "output_dir", "train.lr", "train.max_steps", "train.epochs", "train.schedule", "train.warmup_ratio",
    "train.warmup_steps", "train.max_grad_norm", "train.precision", "train.grad_accum",
    "train.log_every", "train.report_to", "train.eval_every", "train.save_every", "train.keep_last", "train.threads",
    "train.compile", "train.cudnn_sdpa", "train.gradient_checkpointing", "train.chunked_ce", "train.ce_chunk_size",
    "model.attn_implementation", "eval.", "distributed.",
    "classification.threshold", "classification.metric_for_best", "classification.early_stopping_patience",
    "classification.early_stopping_min_delta",
)


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def step_dirs(output_dir: Path) -> list[Path]:
    """Every ``checkpoints/step-N`` directory, complete or not, oldest (smallest N) first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def clean_leftovers(output_dir: Path, say: Callable[[str], None] = _warn) -> None:
    """Remove the temporary directories killed checkpoint writes left under ``checkpoints/``.

    ``.tmp-step-N-*`` is a write that never finished: removed. ``.old-step-N-<pid>`` is the previous
    ``step-N`` set aside while a new ``step-N`` replaced it; if the process died between the two renames
    (``step-N`` is missing) and it is intact, it is moved back, otherwise it is removed. Call only while
    holding the run (no other process writes this run's checkpoints).
    """
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if path.name.startswith(".old-"):
            target = root / path.name[len(".old-"):].rsplit("-", 1)[0]
            if not target.exists() and target.name.startswith("step-") and not manifest_problems(path):
                os.replace(path, target)
                say(f"restored checkpoint {target.name} (its replacement was interrupted)")
                continue
        elif not path.name.startswith(".tmp-"):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        say(f"removed {path.name} under {root} (left by an interrupted checkpoint write)")


def resume_checkpoint(output_dir: Path, say: Callable[[str], None] = _warn) -> Path:
    """The newest intact checkpoint of the run in ``output_dir`` (leftovers cleaned up first).

    A damaged or incomplete newer checkpoint is reported (which file, what is wrong) and skipped.

    Raises:
        TunelabError: there is no checkpoint, or none is intact (each one's problems are listed).
    """
    clean_leftovers(output_dir, say)
    candidates = step_dirs(output_dir)
    if not candidates:
        raise TunelabError(f"--resume: no checkpoint in {output_dir / 'checkpoints'} yet (the run stopped before its first "
                           "checkpoint, train.save_every): start it again with --overwrite")
    damaged = []
    for path in reversed(candidates):
        problems = manifest_problems(path)
        if not problems:
            if damaged:
                _set_aside(candidates[candidates.index(path) + 1:], say)
                say(f"resuming from {path}, the newest intact checkpoint")
            return path
        damaged.append(f"{path.name}: {'; '.join(problems)}")
        say(f"warning: checkpoint {path} is damaged or incomplete ({'; '.join(problems)}); not resuming from it")
    raise TunelabError(f"--resume: no intact checkpoint in {output_dir / 'checkpoints'} ({' | '.join(damaged)}); "
                       "the run cannot continue; start it again with --overwrite")


def verified_checkpoint(path: Path) -> Path:
    """``path`` if it is an intact checkpoint (``--resume-from PATH``).

    Raises:
        TunelabError: it is not a checkpoint directory, or it is damaged (the problems are listed).
    """
    if not (path / "state.json").is_file() and not (path / "manifest.json").is_file():
        raise TunelabError(f"--resume {path}: not a checkpoint directory (no state.json)")
    problems = manifest_problems(path)
    if problems:
        raise TunelabError(f"--resume {path}: the checkpoint is damaged or incomplete ({'; '.join(problems)}); "
                           "resume from an earlier one or with --resume (the newest intact one)")
    return path


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: value}


def _resolved(text: str) -> Any:
    """The config text with today's defaults filled in, so a key added to the schema after a checkpoint
    was written does not count as changed; the text as it is when it no longer validates."""
    from tunelab.config.load import dump_config, validate_config

    raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        return raw
    try:
        return yaml.safe_load(dump_config(validate_config(raw)))
    except (TunelabError, ValueError):
        return raw


def may_change(key: str) -> bool:
    """True when a resumed run may give config key ``key`` (dotted) another value."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def config_changes(old_yaml: str, new_yaml: str) -> tuple[list[str], list[str]]:
    """``(refused, allowed)``: the differences ``KEY: OLD -> NEW`` between a checkpoint's resolved config
    and the resumed run's, split by :func:`may_change`. Both empty when either text is not a mapping
    (nothing to compare)."""
    old, new = _resolved(old_yaml), _resolved(new_yaml)
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [], []
    old_flat, new_flat = _flatten(old), _flatten(new)
    refused, allowed = [], []
    for key in sorted(set(old_flat) | set(new_flat)):
        before, after = old_flat.get(key, "<unset>"), new_flat.get(key, "<unset>")
        if before != after:
            (allowed if may_change(key) else refused).append(f"{key}: {before!r} -> {after!r}")
    return refused, allowed


def check_resumed_config(checkpoint: Path, config_yaml: str, say: Callable[[str], None] = _warn) -> None:
    """Refuse a resumed config that changes keys which cannot change; list the ones that may.

    Raises:
        TunelabError: keys outside :data:`MAY_CHANGE` differ from ``checkpoint/config.yaml``.
    """
    saved = checkpoint / "config.yaml"
    if not saved.is_file():
        return
    refused, allowed = config_changes(saved.read_text(), config_yaml)
    if refused:
        raise TunelabError(
            f"--resume: this config differs from the one checkpoint {checkpoint} was trained with in keys that "
            f"cannot change in a resumed run: {'; '.join(refused)}. Resume with the checkpoint's values (see "
            f"{saved}), or start a new run in another output_dir")
    if allowed:
        say("resume: config changed since the checkpoint (takes effect now): " + "; ".join(allowed))


DAMAGED_PREFIX = "damaged-"


def _set_aside(damaged: list[Path], say: Callable[[str], None]) -> None:
    """Rename checkpoints newer than the one resumed to ``damaged-step-N`` beside them: kept for a look
    (tunelab deletes nothing it cannot vouch for), but no longer a ``step-*`` checkpoint, so rotation
    (``train.keep_last``) does not count them and delete intact ones in their place, and the resumed run
    can write its own ``step-N`` again. ``--overwrite`` removes them with the other checkpoints."""
    for path in damaged:
        target = path.with_name(DAMAGED_PREFIX + path.name)
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{DAMAGED_PREFIX}{n}-{path.name}")
        path.rename(target)
        say(f"moved the damaged {path.name} aside to {target} (kept; not counted by train.keep_last)")
