"""Stage chaining: which earlier tunelab run a model reference names, and the lineage a run records.

``model.name_or_path`` may be the ``output_dir`` of an earlier *finished* causal-LM run (continued
pre-training → SFT → DPO → PPO, any order, any depth). :func:`tunelab.models.run.load_weights` then
loads it as weights: a full/freeze run's own weights, or a LoRA run's adapter merged into its base
(in memory; recursively when that base is itself a run; a QLoRA adapter into the NF4-dequantized
base it was trained against). The tokenizer (with any added tokens) and chat template are the run's.

What is refused (:class:`tunelab.errors.ModelLoadError`, one message naming the directory):
  * a checkpoint directory (``<run>/checkpoints/step-N``): it holds the trainable weights and
    optimizer state of an unfinished run, not a model; finish (resume) the run and start from it;
  * an unfinished run: checkpoints or metrics but no ``tunelab.json`` (interrupted), a checkpoint
    newer than the ``tunelab.json`` (an ``--overwrite`` or ``--resume`` in progress or killed), or a
    directory a live ``train`` holds (its run lock);
  * a classification/reward run (``task_type`` ``SEQ_CLS``): its head is not a language-model head.

The lineage (``tunelab.json`` key ``lineage``) lists the earlier runs a run started from, oldest
first: each entry ``{"output_dir", "task", "method", "base_model", "weights_sha256"}``, the digest of
the weight files the run read (:func:`weights_digest`), so a later change of an earlier directory is
detected (:func:`check_lineage`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tunelab.errors import ModelLoadError
from tunelab.training.checkpoint import checkpoint_step, list_checkpoints
from tunelab.training.outputs import RUN_MARKERS
from tunelab.training.outputs.lock import refuse_if_locked

RUN_INFO = "tunelab.json"
WEIGHT_FILES = ("*.safetensors", "*.bin")


def run_directory(reference: str | Path) -> Path | None:
    """The finished tunelab run (or PEFT adapter folder) ``reference`` names, else ``None``.

    ``None`` for anything that is not a local directory (alias, hub id, ``.gguf`` file) and for a
    plain transformers model directory (loaded as is by :func:`tunelab.models.loading.load_model`).

    Raises:
        ModelLoadError: a checkpoint directory or an unfinished run (see the module docstring).
    """
    path = Path(str(reference)).expanduser()
    if not path.is_dir():
        return None
    if checkpoint_step(path) is not None and (path / "state.json").is_file():
        run = path.parent.parent
        raise ModelLoadError(
            f"model.name_or_path {path} is a training checkpoint (optimizer state and trainable weights of an "
            f"unfinished run), not a model: resume the run to its end (tunelab train {run}/config.yaml --resume) "
            f"and start from {run}, the run directory")
    entries = {p.name for p in path.iterdir()}
    if RUN_INFO in entries:
        _refuse_unfinished(path)
        return path
    if any(name in entries for name in RUN_MARKERS):
        raise ModelLoadError(
            f"model.name_or_path {path} is an unfinished tunelab run (it holds {', '.join(sorted(entries & set(RUN_MARKERS)))} "
            "but no tunelab.json, which a run writes last): resume it with --resume, then start from it")
    if (path / "adapter_config.json").is_file():
        return path  # a PEFT adapter folder written by another tool: merged into its base like a run
    return None


def _refuse_unfinished(path: Path) -> None:
    refuse_if_locked(path, f"start from {path}")
    info = json.loads((path / RUN_INFO).read_text())
    checkpoints = list_checkpoints(path)
    steps = (info.get("results") or {}).get("steps")
    if checkpoints and isinstance(steps, int) and checkpoint_step(checkpoints[-1]) > steps:
        raise ModelLoadError(
            f"model.name_or_path {path}: its newest checkpoint {checkpoints[-1].name} is newer than its final model "
            f"(step {steps}): a run replacing or extending it was interrupted; resume it (--resume) or start from "
            "another directory")


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """``tunelab.json`` of a run, or a synthetic one for a plain HF/PEFT directory.

    Raises:
        ModelLoadError: the directory is none of these.
    """
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


def weights_digest(run_dir: Path) -> str:
    """SHA-256 over a directory's weight files (``*.safetensors``, ``*.bin``): names and bytes, sorted by name."""
    digest = hashlib.sha256()
    for path in sorted({p for pattern in WEIGHT_FILES for p in run_dir.glob(pattern)}):
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def lineage_entry(run_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """One lineage record of the finished run in ``run_dir`` (whose ``tunelab.json`` is ``info``)."""
    task = info.get("task")
    if task is None and (run_dir / "config.yaml").is_file():
        import yaml

        task = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("task")
    return {"output_dir": str(run_dir.resolve()), "task": task, "method": info.get("method"),
            "base_model": info.get("base_model"), "weights_sha256": weights_digest(run_dir)}


def start_lineage(reference: str, output_dir: Path | None = None) -> list[dict[str, Any]]:
    """The lineage a run starting from ``reference`` records: ``[]`` for a model that is no run, else the
    earlier run's own lineage followed by the earlier run itself.

    Raises:
        ModelLoadError: ``reference`` is a checkpoint, an unfinished run, a classification/reward
            run, or this run's own ``output_dir`` (which the run would overwrite).
    """
    run_dir = run_directory(reference)
    if run_dir is None:
        return []
    if output_dir is not None and run_dir.resolve() == Path(output_dir).resolve():
        raise ModelLoadError(f"model.name_or_path {reference} is this run's own output_dir; start from it "
                             "into another output_dir")
    info = read_run_info(run_dir)
    if info.get("task_type", "CAUSAL_LM") != "CAUSAL_LM":
        raise ModelLoadError(
            f"model.name_or_path {reference} is a {info.get('task_type')} run (classifier or reward model): a run "
            "can start only from an earlier causal-LM run (its language-model head); start from that run's base "
            f"model ({info.get('base_model')}) instead")
    earlier = info.get("lineage")
    if earlier is None:  # a run from before lineage records: walk its recorded base instead
        base = info.get("base_model")
        earlier = start_lineage(base) if info.get("method") == "lora" and base and run_directory(base) else []
    return [*earlier, lineage_entry(run_dir, info)]


def check_lineage(run_dir: Path, info: dict[str, Any], base_dir: Path) -> None:
    """Refuse a LoRA run whose base run directory changed since the run was trained on it.

    Raises:
        ModelLoadError: the base run's weights digest differs from the one in ``info["lineage"]``.
    """
    recorded = next((e for e in reversed(info.get("lineage") or [])
                     if Path(e["output_dir"]).resolve() == base_dir.resolve()), None)
    if recorded is None:
        return
    now = weights_digest(base_dir)
    if now != recorded["weights_sha256"]:
        raise ModelLoadError(
            f"{run_dir}: its adapter was trained on the run {base_dir}, whose weights changed since "
            f"(sha256 {recorded['weights_sha256'][:12]}… then, {now[:12]}… now); restore that run or retrain")
