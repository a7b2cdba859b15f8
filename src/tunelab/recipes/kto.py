"""KTO: Kahneman-Tversky Optimization on unpaired desirable/undesirable completions
(Ethayarajh et al. 2024, arXiv:2402.01306), run by ``task: dpo`` with ``preference.loss: kto``.

records (``label: true/false``, or pairs split into a desirable and an undesirable example) →
:mod:`tunelab.data.kto` batches ``[examples; mismatched prompt/completion]`` → ONE policy forward →
summed completion log-probs → reference (adapters off / frozen copy, eval mode) → pure
:func:`tunelab.losses.preference.kto_loss` (``z_ref`` from the mismatched rows) → AdamW step.

Held-out evaluation: the KTO loss and per-class implicit rewards (``rewards/chosen`` = desirable,
``rewards/rejected`` = undesirable, ``kto/kl``) over all held-out examples at once, and, when the
held-out records are pairs, the same pair metrics a DPO run reports (``pairs/policy/accuracy``,
``pairs/rewards/accuracy``, ``pairs/rewards/margins``, ...; :func:`tunelab.recipes.dpo.pair_metrics`, from the
same forward passes),
so KTO and DPO runs on the same pairs compare directly. Deliberate simplifications: ``z_ref`` is
estimated per micro-batch (the paper and TRL gather it over the whole, possibly distributed,
batch); no precomputed reference (the mismatched pairs change with the batch).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from tunelab.config.load import dump_config
from tunelab.config.preference import PreferenceConfig
from tunelab.config.schema import Config
from tunelab.data.kto import kto_batch_plan, prepare_kto
from tunelab.data.preference import PairTokenizer, reply_text
from tunelab.losses.preference import kto_loss
from tunelab.models.logps import PairLogps, Reference, disable_dropout, eval_pair_logps, make_reference, pair_logps
from tunelab.recipes.dpo import _answers, _report, _sample_prompts, _save, load_start_model, pair_metrics
from tunelab.recipes.prepare import (
    before_training, quantize_base, check_output_dir, count_parameters, seed_everything, setup_trainable, upcast_trainable,
    weights_dtype,
)
from tunelab.training.loop import Batch, fit, selection_results
from tunelab.training.metrics import plot_loss_curve
from tunelab.training.precision import autocast, pick_device


def train(config: Config, *, resume: bool | str | None = None, overwrite: bool = False,
          console: Console | None = None) -> dict[str, Any]:
    """Run KTO as configured; returns the results stored in ``tunelab.json``.

    Entered through :func:`tunelab.recipes.dpo.train` (``task: dpo``, ``preference.loss: kto``), whose
    decorator has already checked and locked ``output_dir`` for the whole run."""
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
    data = prepare_kto(dc, tokenizer, tc.seed)
    console.print(f"[bold]data[/] KTO examples train={data.train_stats.summary()}")
    encode = PairTokenizer(tokenizer, dc.max_seq_len)
    pad = tokenizer.pad_token_id
    plan = kto_batch_plan(data.train, encode, batch_size=tc.batch_size, shuffle=dc.shuffle, seed=tc.seed,
                          pad_token_id=pad)
    eval_batches = kto_batch_plan(data.validation, encode, batch_size=config.eval.batch_size, shuffle=False, seed=0,
                                  pad_token_id=pad).make_epoch(0) if data.validation else []
    kind = pc.resolved_reference(tc.method)
    reference = make_reference(kind, model) if kind == "frozen_copy" else None

    def evaluate() -> dict[str, float]:
        return evaluate_kto(model, eval_batches, data.validation_pairs, reference, pc, device, tc.precision)

    prompts = _sample_prompts(data.validation_examples, config.eval.sample_questions)
    kept = before_training(output_dir, resume_from, lambda: {
        "answers_before": _answers(model, tokenizer, prompts, config),
        "held_out_before": evaluate() if eval_batches and config.eval.before_training else None})
    before, answers_before = kept.get("held_out_before"), kept.get("answers_before") or []

    setup_trainable(model, config)
    upcast_trainable(model)
    if pc.disable_dropout:
        disable_dropout(model)
    if kind == "adapters_off":
        reference = make_reference(kind, model)
    trainable, total = count_parameters(model)
    console.print(f"[bold]model[/] {config.model.name_or_path}: {trainable:,} trainable of {total:,} parameters "
                  f"({tc.method}), loss kto beta {pc.beta} weights {pc.desirable_weight}/{pc.undesirable_weight}, "
                  f"reference {kind}, device {device}")
    result = fit(model, plan, lambda m, b, n: kto_step_loss(m, b, n, reference, pc), lambda b: b["num_pairs"],
                 tc, output_dir, config_yaml, evaluate=evaluate if eval_batches else None, resume_from=resume_from,
                 device=device)
    after = result.held_out()  # the best evaluation's with train.metric_for_best (its weights are saved)
    answers_after = _answers(model, tokenizer, prompts, config)
    results = {"train": data.train_stats.summary(), "held_out": data.validation_stats.summary(), "loss": "kto",
               "beta": pc.beta, "desirable_weight": pc.desirable_weight, "undesirable_weight": pc.undesirable_weight,
               "reference": kind, "held_out_before": before, "held_out_after": after, "steps": result.state.step,
               **selection_results(result, tc),
               "train_seconds": round(time.perf_counter() - started, 1),
               "samples": [{"prompt": reply_text(p), "before": b, "after": a}
                           for p, b, a in zip(prompts, answers_before or [None] * len(prompts), answers_after)]}
    _save(model, tokenizer, config, config_yaml, results, merge=from_adapter)
    plot_loss_curve(result.history, output_dir / "loss_curve.png", title=f"kto {config.model.name_or_path}")
    if after and "pairs" in after:
        _report(console, {**results, "held_out_before": _pair_view(before), "held_out_after": _pair_view(after)},
                output_dir)
    else:
        console.print(f"[bold green]saved[/] {output_dir} ({results['steps']} steps, {results['train_seconds']} s)")
    return results


def _pair_view(metrics: dict[str, float] | None) -> dict[str, float] | None:
    """The ``pairs/...`` metrics without their prefix (the DPO report's keys)."""
    return {k.removeprefix("pairs/"): v for k, v in metrics.items() if k.startswith("pairs/")} if metrics else None


def kto_step_loss(model: nn.Module, batch: Batch, normalizer: int, reference: Reference | None,
                  pc: PreferenceConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO loss of one micro-batch, weighted by its share of the optimizer step's examples.

    Raises:
        ValueError: no reference (KTO is reference-based).
    """
    if reference is None:
        raise ValueError("kto needs reference log-probs")
    policy = pair_logps(model, batch)  # chosen = the examples, rejected = their mismatched sequences
    ref = reference(batch)
    loss, metrics = kto_loss(policy.chosen, ref.chosen.detach(), batch["desirable"], policy.rejected.detach(),
                             ref.rejected.detach(), batch["kl_mask"], beta=pc.beta,
                             desirable_weight=pc.desirable_weight, undesirable_weight=pc.undesirable_weight)
    scale = policy.chosen.shape[0] / normalizer
    return loss * scale, {k: v * scale for k, v in metrics.items()}


@torch.no_grad()
def evaluate_kto(model: nn.Module, batches: list[Batch], pairs: list[tuple[int, int]], reference: Reference | None,
                 pc: PreferenceConfig, device: torch.device, precision: str = "fp32") -> dict[str, float]:
    """KTO loss and metrics over all held-out examples at once (z_ref from all their mismatched rows), plus
    DPO-comparable pair metrics (``pairs/...``, :func:`tunelab.recipes.dpo.pair_metrics` with the DPO loss)
    from the same forward passes: ``pairs`` holds ``(desirable, undesirable)`` example indices of held-out
    records that were pairs. Before training (no reference yet) the reference is the policy itself."""
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("pl", "rl", "pkl", "rkl", "des", "kl_mask", "n", "idx")}
    for batch in batches:
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with autocast(precision, device):
            policy = eval_pair_logps(model, tensors)
            ref = reference(tensors) if reference is not None else policy
        for key, value in zip(cols, (policy.chosen, ref.chosen, policy.rejected, ref.rejected, tensors["desirable"],
                                     tensors["kl_mask"], policy.chosen_tokens, tensors["pair_index"])):
            cols[key].append(value.float().cpu() if value.is_floating_point() else value.cpu())
    c = {k: torch.cat(v) for k, v in cols.items()}
    loss, metrics = kto_loss(c["pl"], c["rl"], c["des"], c["pkl"], c["rkl"], c["kl_mask"], beta=pc.beta,
                             desirable_weight=pc.desirable_weight, undesirable_weight=pc.undesirable_weight)
    out = {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}, "examples": int(c["pl"].numel())}
    row = {int(i): r for r, i in enumerate(c["idx"].tolist())}
    kept = [(row[w], row[lo]) for w, lo in pairs if w in row and lo in row]
    if kept:
        w, lo = torch.tensor([p[0] for p in kept]), torch.tensor([p[1] for p in kept])
        side = lambda key: (c[key][w], c[key][lo])  # noqa: E731
        policy_pairs = PairLogps(*side("pl"), *side("n"))
        ref_pairs = PairLogps(*side("rl"), *side("n"))
        found = pair_metrics(pc.model_copy(update={"loss": "dpo"}), policy_pairs, ref_pairs)
        out.update({f"pairs/{k}": v for k, v in found.items()})
        out["pairs"] = found["pairs"]
    return out
