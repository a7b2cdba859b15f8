"""Sequence classification / regression of texts with an encoder or a decoder LLM.

records → label space → tokenize → pad → ``AutoModelForSequenceClassification`` head read at the
right token (``models/heads.sequence_logits``) → CE / BCE / MSE (``losses/classification``) →
AdamW step. Held-out metrics (scikit-learn) at every ``train.eval_every`` and at the end; the
evaluation best in ``classification.metric_for_best`` is kept (its weights are restored before
saving) and ``classification.early_stopping_patience`` stops a run that stopped improving.

With LoRA, the modules the checkpoint lacks (the new head, e.g. ``score`` or ``classifier``) are
trained in full and saved with the adapter as PEFT ``modules_to_save``, so ``peft`` and tunelab
load the same classifier. The label names go into the model config (``id2label``/``label2id``)
and into ``tunelab.json``.

Simplifications: the best weights are tracked in memory, so after ``--resume`` only evaluations
of the resumed process compete; an early-stopped run writes no final checkpoint (it is finished).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from tunelab.config.classification import HF_PROBLEM_TYPES, higher_is_better
from tunelab.config.load import dump_config
from tunelab.config.schema import Config
from tunelab.data.classification import (
    LabelSpace, class_weight_vector, classification_batch_plan, prepare_classification_data,
)
from tunelab.errors import ConfigError, TunelabError
from tunelab.eval.report import per_class_table
from tunelab.eval.classification import PER_CLASS, evaluate_classifier, plot_confusion_matrix, scalar_metrics
from tunelab.losses.classification import classification_loss
from tunelab.models.heads import sequence_logits
from tunelab.models.linear_probe import init_head_by_probe
from tunelab.models.loading import load_model, load_tokenizer
from tunelab.models.run import save_run
from tunelab.recipes.prepare import (
    before_training, check_output_dir, count_parameters, seed_everything, setup_trainable,
)
from tunelab.training.loop import fit, total_steps
from tunelab.training.metrics import plot_loss_curve
from tunelab.training.precision import pick_device
from tunelab.training.outputs import holds_run_lock

HEAD_NAMES = ("score", "classifier")


@holds_run_lock  # checks and locks output_dir for the whole run (training/outputs/)
def train(config: Config, *, resume: bool | str | None = None, overwrite: bool = False,
          console: Console | None = None) -> dict[str, Any]:
    """Train a classifier as configured; returns the results also stored in ``tunelab.json``."""
    console = console or Console()
    started = time.perf_counter()
    cc, tc = config.classification, config.train
    output_dir = Path(config.output_dir)
    resume_from = check_output_dir(output_dir, resume, overwrite)
    seed_everything(tc.seed, tc.threads)
    device = pick_device()
    config_yaml = dump_config(config)

    tokenizer = load_tokenizer(config.model.name_or_path, trust_remote_code=config.model.trust_remote_code,
                               revision=config.model.revision)
    data = prepare_classification_data(config, tokenizer)
    if cc.early_stopping_patience and not data.validation:
        raise ConfigError("classification.early_stopping_patience needs held-out data: set data.validation "
                          "or data.val_fraction")
    console.print(f"[bold]data[/] labels={data.labels.names} train={data.train_stats.summary()}")
    if data.validation:
        console.print(f"[bold]data[/] held-out={data.validation_stats.summary()}")

    model, head_modules = load_classifier(config, data.labels, tokenizer)
    model.to(device)
    weights = class_weight_vector(cc.class_weights, data.train, data.labels)
    eval_batches = classification_batch_plan(data.validation, batch_size=config.eval.batch_size, shuffle=False,
                                             seed=0, pad_token_id=tokenizer.pad_token_id).make_epoch(0)

    def evaluate_full() -> dict[str, Any]:
        return evaluate_classifier(model, eval_batches, device, problem_type=cc.problem_type,
                                   names=data.labels.names, threshold=cc.threshold, class_weights=weights,
                                   precision=tc.precision)

    if cc.head_init == "linear_probe" and resume_from is None:
        probe_started = time.perf_counter()
        probe_batches = classification_batch_plan(data.train, batch_size=config.eval.batch_size, shuffle=False,
                                                  seed=0, pad_token_id=tokenizer.pad_token_id).make_epoch(0)
        probe = init_head_by_probe(model, head_modules, probe_batches, device, cc.problem_type,
                                   data.labels.num_labels, weights, seed=tc.seed)
        probe["seconds"] = round(time.perf_counter() - probe_started, 1)
        console.print(f"[bold]linear probe[/] head initialized from frozen features: {probe}")
    else:
        probe = None

    kept = before_training(output_dir, resume_from, lambda: {
        "linear_probe": probe,
        "held_out_before": evaluate_full() if eval_batches and config.eval.before_training else None})
    probe, before = kept.get("linear_probe"), kept.get("held_out_before")
    if before:
        console.print("[bold]before[/] " + _fmt(scalar_metrics(before)))

    setup_trainable(model, config, modules_to_save=head_modules if tc.method == "lora" else [])
    for name in head_modules:
        model.get_submodule(name).requires_grad_(True)
    trainable, total = count_parameters(model)
    console.print(f"[bold]model[/] {config.model.name_or_path}: {trainable:,} trainable of {total:,} parameters "
                  f"({tc.method}, head {head_modules}), device {device}")

    plan = classification_batch_plan(data.train, batch_size=tc.batch_size, shuffle=config.data.shuffle,
                                      seed=tc.seed, pad_token_id=tokenizer.pad_token_id)
    counter = _StepCounter(tc.grad_accum, _resumed_step(resume_from))
    planned_steps = total_steps(plan, tc)
    selector = BestSelector(model, cc.metric_for_best, cc.early_stopping_patience, cc.early_stopping_min_delta)

    def compute_loss(m: nn.Module, batch: dict[str, torch.Tensor], normalizer: int):
        counter.micro_batches += 1
        return classification_loss(cc.problem_type, sequence_logits(m, batch), batch["labels"], normalizer, weights)

    def evaluate() -> dict[str, float]:
        full = evaluate_full()
        if selector.update(counter.step, full) and counter.step < planned_steps:
            _append_metrics(output_dir, counter.step, scalar_metrics(full))
            raise _EarlyStop
        return scalar_metrics(full)

    fit_started = time.perf_counter()
    try:
        result = fit(model, plan, compute_loss, lambda b: b["num_examples"], tc, output_dir, config_yaml,
                     evaluate=evaluate if eval_batches else None, resume_from=resume_from, device=device)
        steps, history = result.state.step, result.history
    except _EarlyStop:
        steps, history = counter.step, _read_metrics(output_dir)
        console.print(f"[yellow]early stop[/] at step {steps}: no {cc.metric_for_best} improvement in "
                      f"{cc.early_stopping_patience} evaluations")
    fit_seconds = time.perf_counter() - fit_started
    selector.restore()

    results = {
        "label_space": {"problem_type": cc.problem_type, "names": data.labels.names, "threshold": cc.threshold},
        "train": data.train_stats.summary(), "held_out": data.validation_stats.summary() if data.validation else None,
        "linear_probe": probe, "held_out_before": scalar_metrics(before) if before else None,
        "held_out_best": selector.best_metrics,
        "metric_for_best": cc.metric_for_best, "best_step": selector.best_step, "steps": steps,
        "stopped_early": steps < planned_steps, "fit_seconds": round(fit_seconds, 1),
        "train_seconds": round(time.perf_counter() - started, 1), "head_modules": head_modules,
    }
    model.train(False)
    save_run(output_dir, model, tokenizer, method=tc.method, base_model=config.model.name_or_path,
             config_yaml=config_yaml, results=results, task_type="SEQ_CLS",
             modules_to_save=head_modules if tc.method == "lora" else [])
    plot_loss_curve(history, output_dir / "loss_curve.png", title=f"classification {config.model.name_or_path}")
    if selector.best_metrics and "confusion_matrix" in selector.best_metrics:
        plot_confusion_matrix(selector.best_metrics["confusion_matrix"], data.labels.names,
                              output_dir / "confusion_matrix.png", title=f"held-out, step {selector.best_step}")
    _report(console, results, output_dir)
    return results


def load_classifier(config: Config, labels: LabelSpace, tokenizer: Any) -> tuple[nn.Module, list[str]]:
    """``AutoModelForSequenceClassification`` with K outputs and label names; returns it and its new modules.

    New modules are those whose weights the checkpoint lacks (the freshly initialized head), found
    from transformers' loading info, plus a ``score``/``classifier`` head if present. The model's
    ``pad_token_id`` is set from the tokenizer (whose pad falls back to EOS), so transformers'
    own forward also works on the saved model.
    """
    from transformers import AutoModelForSequenceClassification

    mc = config.model
    model, info = load_model(
        mc.name_or_path, AutoModelForSequenceClassification, trust_remote_code=mc.trust_remote_code,
        allow_pickle=mc.allow_pickle, revision=mc.revision, attn_implementation=mc.attn_implementation,
        id2label=labels.id2label, label2id=labels.label2id,
        problem_type=HF_PROBLEM_TYPES[labels.problem_type], output_loading_info=True,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    modules = {key.rsplit(".", 1)[0] for key in info.get("missing_keys", ()) if "." in key}
    modules.update(name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module))
    return model, sorted(m for m in modules if not any(m.startswith(o + ".") for o in modules))


class BestSelector:
    """Tracks the best evaluation by ``metric`` and a copy of the trainable weights at that point.

    ``update`` returns True when ``patience`` evaluations in a row failed to improve by more than
    ``min_delta`` (early stopping); ``restore`` puts the best weights back.
    """

    def __init__(self, model: nn.Module, metric: str, patience: int | None, min_delta: float):
        self.model, self.metric, self.patience, self.min_delta = model, metric, patience, min_delta
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.best_metrics: dict[str, Any] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.num_bad = 0

    def update(self, step: int, metrics: dict[str, Any]) -> bool:
        """Record an evaluation at optimizer step ``step``; True means stop now."""
        if self.metric not in metrics:
            raise TunelabError(f"classification.metric_for_best={self.metric} cannot be computed on the held-out "
                               f"data (available: {sorted(scalar_metrics(metrics))}); choose another metric")
        value = metrics[self.metric]
        if higher_is_better(self.metric):
            improved = self.best_value is None or value > self.best_value + self.min_delta
        else:
            improved = self.best_value is None or value < self.best_value - self.min_delta
        if improved:
            self.best_value, self.best_step, self.best_metrics, self.num_bad = value, step, metrics, 0
            self.best_state = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        else:
            self.num_bad += 1
        return self.patience is not None and self.num_bad >= self.patience

    def restore(self) -> None:
        """Load the best evaluation's trainable weights back into the model (no-op if none)."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state, strict=False)


class _EarlyStop(Exception):
    """Raised from the evaluation callback to end :func:`fit` early."""


class _StepCounter:
    def __init__(self, grad_accum: int, start_step: int):
        self.grad_accum, self.start_step, self.micro_batches = grad_accum, start_step, 0

    @property
    def step(self) -> int:
        return self.start_step + self.micro_batches // self.grad_accum


def _resumed_step(resume_from: Path | None) -> int:
    return json.loads((resume_from / "state.json").read_text())["step"] if resume_from else 0


def _append_metrics(output_dir: Path, step: int, metrics: dict[str, float]) -> None:
    with (output_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}}) + "\n")


def _read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _report(console: Console, results: dict[str, Any], output_dir: Path) -> None:
    best = results["held_out_best"]
    if best:
        console.print(f"[bold]best[/] step {results['best_step']} by {results['metric_for_best']}: "
                      + _fmt(scalar_metrics(best)))
        if PER_CLASS in best:
            console.print(per_class_table(best[PER_CLASS], "held-out per class"))
    console.print(f"[bold green]saved[/] {output_dir} ({results['steps']} steps, {results['train_seconds']} s)")
