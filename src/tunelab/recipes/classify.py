"""Sequence classification / regression of texts with an encoder or a decoder LLM.

records → label space → tokenize → pad → ``AutoModelForSequenceClassification`` head read at the
right token (``models/heads.sequence_logits``) → CE / BCE / MSE (``losses/classification``) →
AdamW step. Held-out metrics (scikit-learn) at every ``train.eval_every`` and at the end; with
``train.metric_for_best`` the best evaluation's checkpoint is kept and its weights are the ones
saved, and ``train.early_stopping_patience`` stops a run that stopped improving (the shared
selection of :mod:`tunelab.training.selection`; it survives ``--resume``).

With LoRA, the modules the checkpoint lacks (the new head, e.g. ``score`` or ``classifier``) are
trained in full and saved with the adapter as PEFT ``modules_to_save``, so ``peft`` and tunelab
load the same classifier. The label names go into the model config (``id2label``/``label2id``)
and into ``tunelab.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from tunelab.config.classification import HF_PROBLEM_TYPES
from tunelab.config.load import dump_config
from tunelab.config.schema import Config
from tunelab.data.classification import (
    LabelSpace, class_weight_vector, classification_batch_plan, prepare_classification_data,
)
from tunelab.errors import ConfigError
from tunelab.eval.report import per_class_table
from tunelab.eval.classification import PER_CLASS, evaluate_classifier, plot_confusion_matrix, scalar_metrics
from tunelab.losses.classification import classification_loss
from tunelab.models.heads import sequence_logits
from tunelab.models.linear_probe import init_head_by_probe
from tunelab.models.loading import load_model, load_tokenizer
from tunelab.models.run import save_run
from tunelab.recipes.prepare import (
    before_training, quantize_base, check_output_dir, count_parameters, seed_everything, setup_trainable,
)
from tunelab.training.loop import fit
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
    if tc.metric_for_best and not data.validation:
        raise ConfigError(f"train.metric_for_best={tc.metric_for_best} needs held-out data: set data.validation "
                          "or data.val_fraction")
    console.print(f"[bold]data[/] labels={data.labels.names} train={data.train_stats.summary()}")
    if data.validation:
        console.print(f"[bold]data[/] held-out={data.validation_stats.summary()}")

    model, head_modules = load_classifier(config, data.labels, tokenizer)
    model.to(device)
    quantize_base(model, config.model.quantize, exclude=head_modules)  # QLoRA: "before", probe, reference see the NF4 base
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
    def compute_loss(m: nn.Module, batch: dict[str, torch.Tensor], normalizer: int):
        return classification_loss(cc.problem_type, sequence_logits(m, batch), batch["labels"], normalizer, weights)

    fit_started = time.perf_counter()
    result = fit(model, plan, compute_loss, lambda b: b["num_examples"], tc, output_dir, config_yaml,
                 evaluate=(lambda: scalar_metrics(evaluate_full())) if eval_batches else None,
                 resume_from=resume_from, device=device)
    fit_seconds = time.perf_counter() - fit_started
    state, history = result.state, result.history
    best_step = state.best_step if state.best_step is not None else (state.step if eval_batches else None)
    best = evaluate_full() if eval_batches else None  # the weights fit left: the best, or the last without selection

    results = {
        "label_space": {"problem_type": cc.problem_type, "names": data.labels.names, "threshold": cc.threshold},
        "train": data.train_stats.summary(), "held_out": data.validation_stats.summary() if data.validation else None,
        "linear_probe": probe, "held_out_before": scalar_metrics(before) if before else None,
        "held_out_best": best,
        "metric_for_best": tc.metric_for_best, "best_step": best_step, "steps": state.step,
        "stopped_early": state.stopped_early, "fit_seconds": round(fit_seconds, 1),
        "train_seconds": round(time.perf_counter() - started, 1), "head_modules": head_modules,
    }
    model.train(False)
    save_run(output_dir, model, tokenizer, method=tc.method, base_model=config.model.name_or_path,
             config_yaml=config_yaml, results=results, task_type="SEQ_CLS",
             modules_to_save=head_modules if tc.method == "lora" else [])
    plot_loss_curve(history, output_dir / "loss_curve.png", title=f"classification {config.model.name_or_path}")
    if best and "confusion_matrix" in best:
        plot_confusion_matrix(best["confusion_matrix"], data.labels.names,
                              output_dir / "confusion_matrix.png", title=f"held-out, step {best_step}")
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


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _report(console: Console, results: dict[str, Any], output_dir: Path) -> None:
    best = results["held_out_best"]
    if best:
        console.print(f"[bold]best[/] step {results['best_step']} by {results['metric_for_best'] or 'last step'}: "
                      + _fmt(scalar_metrics(best)))
        if PER_CLASS in best:
            console.print(per_class_table(best[PER_CLASS], "held-out per class"))
    console.print(f"[bold green]saved[/] {output_dir} ({results['steps']} steps, {results['train_seconds']} s)")
