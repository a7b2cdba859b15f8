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
from tunelab.training.outputs.writes import LINEAGE_START
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


MODEL_CONFIG_FILES = ("adapter_config.json", "config.json")


def model_files_digest(run_dir: Path) -> str:
    """SHA-256 over the weight files and the configs that shape the model (``adapter_config.json``:
    ``lora_alpha``, targets; ``config.json``): an edited ``lora_alpha`` changes the logits as surely as
    edited weights, so both are covered."""
    digest = hashlib.sha256(weights_digest(run_dir).encode())
    for name in MODEL_CONFIG_FILES:
        if (run_dir / name).is_file():
            digest.update(name.encode() + b"\0" + (run_dir / name).read_bytes())
    return digest.hexdigest()


def lineage_entry(run_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """One lineage record of the finished run in ``run_dir`` (whose ``tunelab.json`` is ``info``)."""
    task = info.get("task")
    if task is None and (run_dir / "config.yaml").is_file():
        import yaml

        task = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("task")
    return {"output_dir": str(run_dir.resolve()), "task": task, "method": info.get("method"),
            "base_model": info.get("base_model"), "weights_sha256": weights_digest(run_dir),
            "model_files_sha256": model_files_digest(run_dir)}


def start_lineage(reference: str, output_dir: Path | None = None) -> list[dict[str, Any]]:
    """The lineage a run starting from ``reference`` records: ``[]`` for a model that is no run, else the
    earlier run's own lineage followed by the earlier run itself.

    Raises:
        ModelLoadError: ``reference`` is a checkpoint, an unfinished run, a classification/reward
            run, or this run's own ``output_dir`` (which the run would overwrite).
    """
    own = Path(str(reference)).expanduser()
    if output_dir is not None and own.is_dir() and own.resolve() == Path(output_dir).resolve():
        # before run_directory: this run's own lock would otherwise read as "in use by another process"
        raise ModelLoadError(f"model.name_or_path {reference} is this run's own output_dir; start from it "
                             "into another output_dir")
    run_dir = run_directory(reference)
    if run_dir is None:
        return []
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

    The base's record is the lineage entry of ``base_dir``'s path, else the last entry (the run's
    direct base, wherever the run tree now lives); its ``model_files_sha256`` (weights and model
    configs) is compared where recorded, else ``weights_sha256`` (runs from before it existed).

    Raises:
        ModelLoadError: the base run's digest differs from the recorded one.
    """
    lineage = info.get("lineage") or []
    recorded = next((e for e in reversed(lineage) if Path(e["output_dir"]).resolve() == base_dir.resolve()),
                    lineage[-1] if lineage and (base_dir / RUN_INFO).is_file() else None)
    if recorded is None:
        return
    key, now = (("model_files_sha256", model_files_digest(base_dir)) if "model_files_sha256" in recorded
                else ("weights_sha256", weights_digest(base_dir)))
    if now != recorded[key]:
        raise ModelLoadError(
            f"{run_dir}: its adapter was trained on the run {recorded['output_dir']}, but the base found at "
            f"{base_dir} has other weights or model configs (sha256 {recorded[key][:12]}… then, {now[:12]}… "
            "now): it was replaced (--overwrite), edited or is another run; restore that run or retrain")


START_RECORD = LINEAGE_START  # a bookkeeping file: never makes a directory "hold" a run


def record_or_check_start(reference: str, output_dir: Path, resuming: bool, *, write: bool = True) -> None:
    """Keep the earlier run a run starts from fixed across ``--resume``.

    A fresh run writes its start's lineage (``output_dir/.tunelab-lineage-start.json``; ``write=False`` on
    ranks other than 0); a resumed run compares the start as it is now with that record, so a base
    replaced (``--overwrite``) or edited while the run was paused is refused instead of silently
    continuing on other weights (the "before" numbers and the lineage would describe another model).

    Raises:
        ModelLoadError: as :func:`start_lineage`; on resume, the start's digests differ from the record.
    """
    lineage = start_lineage(reference, output_dir)
    path = output_dir / START_RECORD
    if not resuming:
        if write:
            from tunelab.training.outputs import atomic_file

            with atomic_file(path) as tmp:
                tmp.write_text(json.dumps(lineage, indent=2))
        return
    if not path.is_file():
        return  # a run from before this record existed
    then = json.loads(path.read_text())
    key = "model_files_sha256"
    if [e.get(key) for e in then] != [e.get(key) for e in lineage]:  # by content: a moved run tree still resumes
        was = then[-1] if then else {"output_dir": "a model that is no run"}
        raise ModelLoadError(
            f"--resume: this run started from {was['output_dir']} (sha256 {str(was.get(key))[:12]}…), but "
            f"model.name_or_path {reference} now gives "
            f"{lineage[-1]['output_dir'] + ' (sha256 ' + lineage[-1][key][:12] + '…)' if lineage else 'no run'}: "
            "the earlier run was replaced or edited while this one was paused; restore it, or start this run "
            "again with --overwrite")
