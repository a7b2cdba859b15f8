"""Direct preference optimization and its family: DPO, IPO, hinge (reference-based), SimPO, ORPO
(reference-free), on a base model or on a finished SFT run; ``preference.loss: kto`` (unpaired data)
runs :mod:`tunelab.recipes.kto`.

pairs → ``[chosen; rejected]`` batch (padded or packed) → ONE policy forward → summed reply
log-probs per side → reference log-probs (adapters off / frozen copy / precomputed, eval mode)
→ pure loss from :mod:`tunelab.losses.preference` → AdamW step.

Starting from an SFT LoRA run directory (``model.name_or_path: runs/support-assistant``), its
adapter is merged into the base weights first, so the reference is the SFT model and a fresh
adapter is trained on top; the result is then saved merged (a full model directory), because a
run's adapter must sit on a loadable base.

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

from tunelab.adapters.lora import merge_lora
from tunelab.config.load import dump_config
from tunelab.config.preference import PreferenceConfig
from tunelab.config.schema import Config
from tunelab.data.preference import PreparedPairs, prepare_pairs, preference_batch_plan, reply_text
from tunelab.data.templates import resolve_chat_template
from tunelab.losses.preference import PREFERENCE_LOSSES
from tunelab.eval.report import print_side_by_side
from tunelab.models.generate import generate_replies
from tunelab.models.loading import load_model, load_tokenizer
from tunelab.models.logps import PairLogps, Reference, disable_dropout, eval_pair_logps, make_reference, pair_logps
from tunelab.models.run import load_run, save_run
from tunelab.recipes.prepare import (
    before_training, quantize_base, check_output_dir, count_parameters, seed_everything,
    setup_trainable, upcast_trainable, weights_dtype,
)
from tunelab.recipes.reward import wilson_interval
from tunelab.training.loop import Batch, BatchPlan, fit, selection_results
from tunelab.training.metrics import plot_loss_curve
from tunelab.training.precision import autocast, pick_device
from tunelab.training.outputs import holds_run_lock


@holds_run_lock  # checks and locks output_dir for the whole run (training/outputs/)
def train(config: Config, *, resume: bool | str | None = None, overwrite: bool = False,
          console: Console | None = None) -> dict[str, Any]:
    """Run DPO (or IPO/hinge/SimPO/ORPO; KTO in :mod:`tunelab.recipes.kto`) as configured; returns the results
    stored in ``tunelab.json``."""
    if config.preference.loss == "kto":
        from tunelab.recipes.kto import train as train_kto

        return train_kto(config, resume=resume, overwrite=overwrite, console=console)
    console = console or Console()
    started = time.perf_counter()
    output_dir, tc, pc, dc = Path(config.output_dir), config.train, config.preference, config.data
    resume_from = check_output_dir(output_dir, resume, overwrite)
    seed_everything(tc.seed, tc.threads)
    device = pick_device()
    config_yaml = dump_config(config)

    model, tokenizer, from_adapter = load_start_model(config, weights_dtype(config, device))
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
                                   device=device)

    def evaluate() -> dict[str, float]:
        return evaluate_preference(model, eval_batches, reference, pc, device, tc.precision)

    prompts = _sample_prompts(data.validation_examples, config.eval.sample_questions)
    kept = before_training(output_dir, resume_from, lambda: {
        "answers_before": _answers(model, tokenizer, prompts, config),
        "held_out_before": evaluate() if eval_batches and config.eval.before_training else None})
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
                 device=device)
    after = result.held_out()  # the best evaluation's with train.metric_for_best (its weights are saved)
    answers_after = _answers(model, tokenizer, prompts, config)
    results = {"train": data.train_stats.summary(), "held_out": data.validation_stats.summary(),
               "loss": pc.loss, "beta": pc.beta, "reference": kind, "held_out_before": before,
               "held_out_after": after, "steps": result.state.step, **selection_results(result, tc),
               "train_seconds": round(time.perf_counter() - started, 1),
               "samples": [{"prompt": reply_text(p), "before": b, "after": a}
                           for p, b, a in zip(prompts, answers_before or [None] * len(prompts), answers_after)]}
    _save(model, tokenizer, config, config_yaml, results, merge=from_adapter)
    plot_loss_curve(result.history, output_dir / "loss_curve.png", title=f"{pc.loss} {config.model.name_or_path}")
    _report(console, results, output_dir)
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
          merge: bool) -> None:
    """Save the run; a policy that started from an SFT adapter is saved merged (full weights)."""
    model.train(False)
    method = config.train.method
    if merge and method == "lora":
        merge_lora(model)
        method = "full"
    save_run(Path(config.output_dir), model, tokenizer, method=method, base_model=config.model.name_or_path,
             config_yaml=config_yaml, results=results)


def load_start_model(config: Config, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, bool]:
    """Model, tokenizer and whether an SFT adapter was merged: a LoRA run directory is loaded as
    base + adapter and merged; anything else loads through :func:`tunelab.models.loading.load_model`."""
    mc = config.model
    path = Path(mc.name_or_path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        model, tokenizer, _ = load_run(path, attn_implementation=mc.attn_implementation, dtype=dtype)
        merge_lora(model)
        model.requires_grad_(True)
        resolve_chat_template(tokenizer, mc.chat_template, config.data.system_prompt)
        return model, tokenizer, True
    tokenizer = load_tokenizer(mc.name_or_path, trust_remote_code=mc.trust_remote_code, revision=mc.revision)
    resolve_chat_template(tokenizer, mc.chat_template, config.data.system_prompt)
    model = load_model(mc.name_or_path, trust_remote_code=mc.trust_remote_code, allow_pickle=mc.allow_pickle,
                       revision=mc.revision, attn_implementation=mc.attn_implementation, dtype=dtype)
    return model, tokenizer, False


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
                        device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """Loss and metrics over all held-out pairs at once, plus the policy's own preference accuracy.

    Before any training (no reference built yet) the reference is the policy itself.
    """
    sides: dict[str, list[torch.Tensor]] = {k: [] for k in ("pc", "pr", "nc", "nr", "rc", "rr")}
    for batch in batches:
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with autocast(precision, device):
            policy = eval_pair_logps(model, tensors)
            ref = reference(tensors) if reference is not None else policy
        for key, value in zip(sides, (policy.chosen, policy.rejected, policy.chosen_tokens, policy.rejected_tokens,
                                      ref.chosen, ref.rejected)):
            sides[key].append(value.float().cpu() if value.is_floating_point() else value.cpu())
    s = {k: torch.cat(v) for k, v in sides.items()}
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
