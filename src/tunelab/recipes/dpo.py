"""Direct preference optimization and its family: DPO, IPO, hinge (reference-based), SimPO, ORPO
(reference-free), on a base model or on a finished SFT run; ``preference.loss: kto`` (unpaired data)
runs :mod:`tunelab.recipes.kto`.

pairs → ``[chosen; rejected]`` batch (padded or packed) → ONE policy forward → summed reply
log-probs per side → reference log-probs (adapters off / frozen copy / precomputed, eval mode)
→ pure loss from :mod:`tunelab.losses.preference` → AdamW step.

Starting from an earlier run directory (``model.name_or_path: runs/support-assistant``, stage
chaining, :mod:`tunelab.models.lineage`), its weights are loaded (a LoRA run's adapter merged into
its base), so the reference is the SFT model and a fresh adapter is trained on top; the new adapter
is saved over that run directory as its base (``tunelab.json`` records the lineage) and loads
merged through it (:func:`tunelab.models.run.load_run`).

Metrics per step and per eval: the loss, ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins``, ``rewards/accuracy`` (implicit rewards, e.g. ``beta (log pi - log ref)``),
``logps/chosen``, ``logps/rejected`` (summed reply log-probs of the policy). Evaluations also
report the policy's own preference: ``policy/accuracy`` (fraction with log pi(y_w) > log pi(y_l)),
``policy/margin`` (mean of that difference, nats), and the same per reply token
(``policy/accuracy_per_token``, ``policy/margin_per_token``). Deliberate simplifications: no
reference-model syncing (TR-DPO), no reward/length regularizers beyond the losses' own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from tunelab.config.load import dump_config
from tunelab.config.preference import PreferenceConfig
from tunelab.config.schema import Config
from tunelab.data.preference import PreparedPairs, prepare_pairs, preference_batch_plan, reply_text
from tunelab.data.templates import resolve_chat_template
from tunelab.losses.preference import PREFERENCE_LOSSES
from tunelab.eval.report import print_side_by_side
from tunelab.models.generate import generate_replies
from tunelab.models.lineage import start_lineage
from tunelab.models.logps import PairLogps, Reference, disable_dropout, eval_pair_logps, make_reference, pair_logps
from tunelab.models.run import load_start_tokenizer, load_weights, save_run, whole_state_dict
from tunelab.recipes.prepare import (
    before_training, quantize_base, count_parameters, setup_trainable, start_run, upcast_trainable, weights_dtype,
)
from tunelab.recipes.reward import wilson_interval
from tunelab.training.loop import Batch, BatchPlan, fit, selection_results
from tunelab.training.metrics import plot_loss_curve
from tunelab.training.distributed import Runtime, single_process
from tunelab.training.precision import autocast
from tunelab.training.outputs import holds_run_lock


@holds_run_lock  # checks and locks output_dir for the whole run (training/outputs/)
def train(config: Config, *, resume: bool | str | None = None, overwrite: bool = False,
          console: Console | None = None) -> dict[str, Any]:
    """Run DPO (or IPO/hinge/SimPO/ORPO; KTO in :mod:`tunelab.recipes.kto`) as configured; returns the results
    stored in ``tunelab.json``."""
    if config.preference.loss == "kto":
        from tunelab.recipes.kto import train as train_kto

        return train_kto(config, resume=resume, overwrite=overwrite, console=console)
    runtime, console, resume_from = start_run(config, resume, overwrite, console)  # torchrun: one call per rank
    started = time.perf_counter()
    output_dir, tc, pc, dc = Path(config.output_dir), config.train, config.preference, config.data
    device = runtime.device
    config_yaml = dump_config(config)

    model, tokenizer, lineage = load_start_model(config, weights_dtype(config, device))
    model.to(device)
    quantize_base(model, config.model.quantize)  # QLoRA: "before", probe, reference see the NF4 base
    if pc.disable_dropout:
        disable_dropout(model)
    data = prepare_pairs(dc, tokenizer, tc.seed)
    console.print(f"[bold]data[/] pairs train={data.train_stats.summary()}")
    plan, eval_batches = _plans(data, config, tokenizer.pad_token_id)
    kind = pc.resolved_reference(tc.method)
    cache = Path(pc.reference_cache or output_dir / "reference_logps") / "reference_logps.safetensors"
    reference = None
    if kind in ("frozen_copy", "precomputed"):  # built from the starting weights, before any training
        reference = make_reference(kind, model, batches=plan.make_epoch(0) + eval_batches, cache_path=cache,
                                   device=device, runtime=runtime)

    def evaluate() -> dict[str, float]:
        return evaluate_preference(model, eval_batches, reference, pc, device, tc.precision, runtime)

    prompts = _sample_prompts(data.validation_examples, config.eval.sample_questions)
    kept = before_training(output_dir, resume_from, lambda: {
        "answers_before": _answers(model, tokenizer, prompts, config),
        "held_out_before": evaluate() if eval_batches and config.eval.before_training else None},
        write=runtime.is_main)
    before, answers_before = kept.get("held_out_before"), kept.get("answers_before") or []
    if before:
        console.print("[bold]before[/] " + _fmt(before))

    setup_trainable(model, config)
    upcast_trainable(model)  # fp32 master weights for adapters on a bf16 base (model.dtype)
    if pc.disable_dropout:
        disable_dropout(model)  # again: LoRA layers injected just now carry lora.dropout
    if kind == "adapters_off":
        reference = make_reference(kind, model)
    trainable, total = count_parameters(model)
    console.print(f"[bold]model[/] {config.model.name_or_path}: {trainable:,} trainable of {total:,} parameters "
                  f"({tc.method}), loss {pc.loss} beta {pc.beta}, reference {kind}, device {device}")
    result = fit(model, plan, lambda m, b, n: preference_step_loss(m, b, n, reference, pc), lambda b: b["num_pairs"],
                 tc, output_dir, config_yaml, evaluate=evaluate if eval_batches else None, resume_from=resume_from,
                 device=device, runtime=runtime)
    after = result.held_out()  # the best evaluation's with train.metric_for_best (its weights are saved)
    with runtime.full_weights():  # FSDP: gather the shards so the model generates as a whole
        answers_after = _answers(model, tokenizer, prompts, config)
    results = {"train": data.train_stats.summary(), "held_out": data.validation_stats.summary(),
               "loss": pc.loss, "beta": pc.beta, "reference": kind, "held_out_before": before,
               "held_out_after": after, "steps": result.state.step, **selection_results(result, tc),
               "train_seconds": round(time.perf_counter() - started, 1),
               "samples": [{"prompt": reply_text(p), "before": b, "after": a}
                           for p, b, a in zip(prompts, answers_before or [None] * len(prompts), answers_after)]}
    _save(model, tokenizer, config, config_yaml, results, lineage, runtime)
    runtime.on_main(plot_loss_curve, result.history, output_dir / "loss_curve.png",
                    title=f"{pc.loss} {config.model.name_or_path}")
    _report(console, results, output_dir)
    runtime.close()
    return results


def _plans(data: PreparedPairs, config: Config, pad_token_id: int) -> tuple[BatchPlan, list[Batch]]:
    tc, dc = config.train, config.data
    plan = preference_batch_plan(data.train, batch_size=tc.batch_size, max_seq_len=dc.max_seq_len,
                                 packing=dc.packing, shuffle=dc.shuffle, seed=tc.seed, pad_token_id=pad_token_id)
    if not data.validation:
        return plan, []
    return plan, preference_batch_plan(data.validation, batch_size=config.eval.batch_size, max_seq_len=dc.max_seq_len,
                                       packing=dc.packing, shuffle=False, seed=0,
                                       pad_token_id=pad_token_id).make_epoch(0)


def _sample_prompts(examples: list[dict[str, Any]], n: int) -> list[list[dict[str, str]]]:
    prompts: list[list[dict[str, str]]] = []
    for example in examples:
        prompt = example["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if prompt not in prompts and len(prompts) < n:
            prompts.append(prompt)
    return prompts


def _save(model: nn.Module, tokenizer: Any, config: Config, config_yaml: str, results: dict[str, Any],
          lineage: list[dict[str, Any]], runtime: Runtime) -> None:
    """Save the run with the lineage of the earlier runs it started from (rank 0, from the whole weights;
    collective under FSDP)."""
    model.train(False)
    weights = whole_state_dict(model) if config.train.method != "lora" else None  # FSDP full: gathered (collective)
    with runtime.full_weights():
        runtime.on_main(save_run, Path(config.output_dir), model, tokenizer, method=config.train.method,
                        base_model=config.model.name_or_path, config_yaml=config_yaml, results=results,
                        lineage=lineage, state_dict=weights)


def load_start_model(config: Config, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, list[dict[str, Any]]]:
    """Model, tokenizer and lineage of the start: an earlier run directory loads as its weights (a LoRA
    run merged into its base, :func:`tunelab.models.run.load_weights`), anything else as a model.

    Raises:
        ModelLoadError: a checkpoint or unfinished run, or a model that cannot be loaded.
    """
    mc = config.model
    lineage = start_lineage(mc.name_or_path, Path(config.output_dir))
    tokenizer = load_start_tokenizer(mc.name_or_path, trust_remote_code=mc.trust_remote_code, revision=mc.revision)
    resolve_chat_template(tokenizer, mc.chat_template, config.data.system_prompt)
    model = load_weights(mc.name_or_path, trust_remote_code=mc.trust_remote_code, allow_pickle=mc.allow_pickle,
                         revision=mc.revision, attn_implementation=mc.attn_implementation, dtype=dtype)
    return model, tokenizer, lineage


def preference_loss(pc: PreferenceConfig, policy: PairLogps,
                    reference: PairLogps | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The configured loss of :data:`tunelab.losses.preference.PREFERENCE_LOSSES` (mean over pairs).

    Raises:
        ValueError: a reference-based loss without reference log-probs.
    """
    fn = PREFERENCE_LOSSES[pc.loss]
    pcl, prl = policy.chosen, policy.rejected
    if pc.loss == "simpo":
        return fn(pcl, prl, policy.chosen_tokens, policy.rejected_tokens, beta=pc.beta, gamma=pc.gamma,
                  label_smoothing=pc.label_smoothing)
    if pc.loss == "orpo":
        nll = -pcl / policy.chosen_tokens.clamp(min=1)
        return fn(pcl, prl, policy.chosen_tokens, policy.rejected_tokens, nll, lam=pc.lam)
    if reference is None:
        raise ValueError(f"loss {pc.loss} needs reference log-probs")
    args = (pcl, prl, reference.chosen.detach(), reference.rejected.detach())
    if pc.loss == "dpo":
        return fn(*args, beta=pc.beta, label_smoothing=pc.label_smoothing)
    return fn(*args, beta=pc.beta)


def preference_step_loss(model: nn.Module, batch: Batch, normalizer: int, reference: Reference | None,
                         pc: PreferenceConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch summed over its pairs / ``normalizer`` (pairs in the optimizer step).

    Metrics are scaled alike, so their sum over an optimizer step's micro-batches is the mean over
    its pairs (:func:`tunelab.training.loop.fit` sums them).
    """
    policy = pair_logps(model, batch)
    ref = reference(batch) if reference is not None else None
    loss, metrics = preference_loss(pc, policy, ref)
    scale = policy.chosen.shape[0] / normalizer
    return loss * scale, {k: v * scale for k, v in metrics.items()}


@torch.no_grad()
def evaluate_preference(model: nn.Module, batches: list[Batch], reference: Reference | None, pc: PreferenceConfig,
                        device: torch.device, precision: str = "fp32",
                        runtime: Runtime | None = None) -> dict[str, float]:
    """Loss and metrics over all held-out pairs at once, plus the policy's own preference accuracy.

    Before any training (no reference built yet) the reference is the policy itself. With a distributed
    ``runtime`` each rank scores its share of the batches and the log-probs of all pairs are gathered
    before the metrics are computed (the same values as one process; collective).
    """
    keys = ("pc", "pr", "nc", "nr", "rc", "rr")

    def run(batch: Batch) -> dict[str, torch.Tensor]:
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with autocast(precision, device):
            policy = eval_pair_logps(model, tensors)
            ref = reference(tensors) if reference is not None else policy
        values = (policy.chosen, policy.rejected, policy.chosen_tokens, policy.rejected_tokens, ref.chosen, ref.rejected)
        return {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in zip(keys, values)}

    outputs = (runtime or single_process(device)).map_shards(run, batches)
    s = {k: torch.cat([o[k] for o in outputs]) for k in keys}
    return pair_metrics(pc, PairLogps(s["pc"], s["pr"], s["nc"], s["nr"]), PairLogps(s["rc"], s["rr"], s["nc"], s["nr"]))


def pair_metrics(pc: PreferenceConfig, policy: PairLogps, reference: PairLogps) -> dict[str, float]:
    """Held-out pair metrics from gathered log-probs: the configured loss and its metrics, plus the policy's
    own preference accuracy (with a 95% Wilson interval) and margin, per sequence and per reply token."""
    loss, metrics = preference_loss(pc, policy, reference)
    out = {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
    s = {"pc": policy.chosen, "pr": policy.rejected, "nc": policy.chosen_tokens, "nr": policy.rejected_tokens}
    diff, diff_tok = s["pc"] - s["pr"], s["pc"] / s["nc"].clamp(min=1) - s["pr"] / s["nr"].clamp(min=1)
    wins = int((diff > 0).sum())
    low, high = wilson_interval(wins, diff.numel())
    out.update({"policy/accuracy": wins / diff.numel(), "policy/accuracy_low": low, "policy/accuracy_high": high,
                "policy/margin": float(diff.mean()), "policy/accuracy_per_token": float((diff_tok > 0).float().mean()),
                "policy/margin_per_token": float(diff_tok.mean()), "pairs": diff.numel()})
    return out


def _answers(model, tokenizer, prompts, config: Config) -> list[str]:
    if not prompts or not tokenizer.chat_template:
        return []
    return generate_replies(model, tokenizer, prompts, max_new_tokens=config.eval.max_new_tokens)


def _fmt(m: dict[str, float]) -> str:
    return (f"held-out policy accuracy {m['policy/accuracy']:.3f} (95% CI {m['policy/accuracy_low']:.3f}-"
            f"{m['policy/accuracy_high']:.3f}), margin {m['policy/margin']:+.3f} nats, "
            f"reward accuracy {m['rewards/accuracy']:.3f}, loss {m['loss']:.4f}")


def _report(console: Console, results: dict[str, Any], output_dir: Path) -> None:
    before, after = results["held_out_before"], results["held_out_after"]
    if after:
        keys = ("loss", "policy/accuracy", "policy/margin", "policy/accuracy_per_token", "rewards/accuracy",
                "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected")
        table = Table(title=f"held-out pairs ({after['pairs']}): {results['loss']}")
        table.add_column("metric")
        for name in ("before", "after") if before else ("after",):
            table.add_column(name)
        for key in keys:
            table.add_row(key, *[f"{m[key]:.4f}" for m in (before, after) if m])
        console.print(table)
    print_side_by_side(console, results["samples"], "held-out prompts: starting model vs preference-tuned", "prompt")
    console.print(f"[bold green]saved[/] {output_dir} ({results['steps']} steps, {results['train_seconds']} s)")
