"""Reward model: a one-output sequence classifier trained on preference pairs (Bradley-Terry).

pairs → ``[chosen; rejected]`` padded batch, or (decoders, ``data.packing``) pairs packed into rows
with restarting ``position_ids`` → ``AutoModelForSequenceClassification(num_labels=1)`` → score at the
last real token (decoders) or the pooled output (encoders), padding- and packing-invariant
(:func:`tunelab.models.heads.sequence_logits`, :func:`tunelab.models.logps.packed_reward_scores`) → ``-log sigma(r_w - r_l - m)``
(Ouyang et al. 2022, arXiv:2203.02155, Eq. 1; margin: Llama 2, arXiv:2307.09288, Eq. 2).
With LoRA the new head is trained in full and saved with the adapter (PEFT ``modules_to_save``).

Reports held-out pairwise accuracy (with a Wilson 95% interval) and mean score margin before and
after training. Deliberate simplifications: one score per sequence, no per-prompt K-choose-2
normalization (every pair is one row), no score centering.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from tunelab.config.load import dump_config
from tunelab.config.schema import Config
from tunelab.data.preference import prepare_pairs, preference_batch_plan, preference_collate
from tunelab.data.templates import resolve_chat_template
from tunelab.errors import ConfigError
from tunelab.losses.reward import bradley_terry_loss
from tunelab.models.heads import is_decoder_classifier
from tunelab.models.linear_probe import init_reward_head_by_probe
from tunelab.models.loading import load_model, load_tokenizer
from tunelab.models.logps import reward_scores
from tunelab.models.run import save_run
from tunelab.recipes.prepare import (
    before_training, quantize_base, check_output_dir, count_parameters, seed_everything,
    setup_trainable, upcast_trainable, weights_dtype,
)
from tunelab.training.loop import fit, selection_results
from tunelab.training.metrics import plot_loss_curve
from tunelab.training.precision import autocast, pick_device
from tunelab.training.outputs import holds_run_lock

HEAD_NAMES = ("score", "classifier", "pre_classifier")


@holds_run_lock  # checks and locks output_dir for the whole run (training/outputs/)
def train(config: Config, *, resume: bool | str | None = None, overwrite: bool = False,
          console: Console | None = None) -> dict[str, Any]:
    """Train a Bradley-Terry reward model as configured; returns the results stored in ``tunelab.json``."""
    from transformers import AutoModelForSequenceClassification

    console = console or Console()
    started = time.perf_counter()
    output_dir, tc, pc = Path(config.output_dir), config.train, config.preference
    resume_from = check_output_dir(output_dir, resume, overwrite)
    seed_everything(tc.seed, tc.threads)
    device = pick_device()
    config_yaml = dump_config(config)

    mc = config.model
    tokenizer = load_tokenizer(mc.name_or_path, trust_remote_code=mc.trust_remote_code, revision=mc.revision)
    resolve_chat_template(tokenizer, mc.chat_template, config.data.system_prompt)
    data = prepare_pairs(config.data, tokenizer, tc.seed, pc.margin_field, pc.margin)
    console.print(f"[bold]data[/] pairs train={data.train_stats.summary()}")
    if data.validation:
        console.print(f"[bold]data[/] pairs held-out={data.validation_stats.summary()}")

    model = load_model(mc.name_or_path, AutoModelForSequenceClassification, num_labels=1,
                       trust_remote_code=mc.trust_remote_code, allow_pickle=mc.allow_pickle, revision=mc.revision,
                       attn_implementation=mc.attn_implementation, dtype=weights_dtype(config, device)).to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    heads = head_modules(model)
    quantize_base(model, config.model.quantize, exclude=heads)  # QLoRA: "before", probe, reference see the NF4 base
    eval_batches = [preference_collate(data.validation[i:i + config.eval.batch_size], tokenizer.pad_token_id)
                    for i in range(0, len(data.validation), config.eval.batch_size)]

    def evaluate() -> dict[str, float]:
        return evaluate_reward(model, eval_batches, device, tc.precision)

    probe = None
    if pc.head_init == "linear_probe" and resume_from is None:
        probe_started = time.perf_counter()
        probe = init_reward_head_by_probe(model, heads, [(p.chosen_ids, p.rejected_ids) for p in data.train],
                                          tokenizer.pad_token_id, device, config.eval.batch_size, tc.seed)
        probe["seconds"] = round(time.perf_counter() - probe_started, 1)
        console.print(f"[bold]linear probe[/] head initialized from frozen features: {probe}")

    kept = before_training(output_dir, resume_from, lambda: {
        "linear_probe": probe,
        "held_out_before": evaluate() if eval_batches and config.eval.before_training else None})
    probe, before = kept.get("linear_probe"), kept.get("held_out_before")
    if before:
        console.print(f"[bold]before[/] held-out pairwise accuracy {_fmt_acc(before)}  margin {before['margin']:+.4f}")
    saved_modules = heads if tc.method == "lora" else []
    setup_trainable(model, config, modules_to_save=saved_modules)
    upcast_trainable(model)  # the new head and adapters train in fp32 on a bf16 base (model.dtype)
    trainable, total = count_parameters(model)
    console.print(f"[bold]model[/] {mc.name_or_path} + 1-output head {heads}: {trainable:,} trainable of "
                  f"{total:,} parameters ({tc.method}), device {device}")
    packing = config.data.packing and is_decoder_classifier(model)
    if config.data.packing and not packing and "packing" in config.data.model_fields_set:
        raise ConfigError(f"data.packing: true needs a decoder reward model; {type(model).__name__} is an encoder "
                          "(its pooled score cannot be read per packed segment): set data.packing: false")
    plan = preference_batch_plan(data.train, batch_size=tc.batch_size, max_seq_len=config.data.max_seq_len,
                                 packing=packing, shuffle=config.data.shuffle, seed=tc.seed,
                                 pad_token_id=tokenizer.pad_token_id)
    use_margin = pc.margin > 0 or pc.margin_field is not None
    result = fit(model, plan, lambda m, b, n: reward_loss(m, b, n, use_margin), lambda b: b["num_pairs"], tc,
                 output_dir, config_yaml, evaluate=evaluate if eval_batches else None, resume_from=resume_from,
                 device=device)
    after = result.held_out()  # the best evaluation's with train.metric_for_best (its weights are saved)
    results = {"train": data.train_stats.summary(), "held_out": data.validation_stats.summary(),
               "linear_probe": probe, "held_out_before": before, "held_out_after": after, "steps": result.state.step,
               **selection_results(result, tc),
               "train_seconds": round(time.perf_counter() - started, 1)}
    model.train(False)
    save_run(output_dir, model, tokenizer, method=tc.method, base_model=mc.name_or_path, config_yaml=config_yaml,
             results=results, task_type="SEQ_CLS", modules_to_save=saved_modules)
    plot_loss_curve(result.history, output_dir / "loss_curve.png", title=f"reward model {mc.name_or_path}")
    _report(console, results, output_dir)
    return results


def head_modules(model: nn.Module) -> list[str]:
    """Names of the (newly initialized) classification-head modules of a sequence classifier."""
    names = [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
    if not names:
        raise ValueError(f"{type(model).__name__} has none of the head modules {HEAD_NAMES}")
    return names


def reward_loss(model: nn.Module, batch: dict[str, torch.Tensor], normalizer: int,
                use_margin: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss of one ``[chosen; rejected]`` micro-batch, summed over pairs / ``normalizer``.

    Metrics are scaled the same way, so summing them over the micro-batches of an optimizer step
    gives means over all its pairs.
    """
    scores = reward_scores(model, batch)
    num_pairs = batch["pair_index"].numel()
    margin = batch["margin"] if use_margin else None
    loss, metrics = bradley_terry_loss(scores[:num_pairs], scores[num_pairs:], margin)
    scale = num_pairs / normalizer
    return loss * scale, {k: v * scale for k, v in metrics.items()}


@torch.no_grad()
def score_batches(model: nn.Module, batches: list[dict[str, Any]], device: torch.device,
                  precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected scores (each (N,) float32, in batch order) of ``[chosen; rejected]`` batches."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for batch in batches:
        tensors = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with autocast(precision, device):
            scores = reward_scores(model, tensors).float().cpu()
        half = scores.shape[0] // 2
        chosen.append(scores[:half])
        rejected.append(scores[half:])
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def evaluate_reward(model: nn.Module, batches: list[dict[str, Any]], device: torch.device,
                    precision: str = "fp32") -> dict[str, float]:
    """Held-out pairwise accuracy (with its Wilson 95% interval), mean margin and BT loss."""
    chosen, rejected = score_batches(model, batches, device, precision)
    return pairwise_summary(chosen, rejected)


def pairwise_summary(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """accuracy (fraction r_w > r_l), its Wilson 95% bounds, mean margin r_w - r_l, BT loss, pairs."""
    loss, _ = bradley_terry_loss(chosen, rejected)
    wins = int((chosen > rejected).sum())
    low, high = wilson_interval(wins, chosen.numel())
    return {"loss": float(loss), "accuracy": wins / max(chosen.numel(), 1), "accuracy_low": low,
            "accuracy_high": high, "margin": float((chosen - rejected).mean()), "pairs": chosen.numel()}


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927), 95% by default.

    Returns ``(low, high)``; ``(0.0, 1.0)`` for zero trials.
    """
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _fmt_acc(m: dict[str, float]) -> str:
    return f"{m['accuracy']:.3f} (95% CI {m['accuracy_low']:.3f}-{m['accuracy_high']:.3f}, n={m['pairs']})"


def _report(console: Console, results: dict[str, Any], output_dir: Path) -> None:
    before, after = results["held_out_before"], results["held_out_after"]
    if after:
        table = Table(title="held-out pairs: reward model")
        for col in ("", "pairwise accuracy (95% CI)", "mean margin", "BT loss"):
            table.add_column(col)
        for name, m in (("before", before), ("after", after)):
            if m:
                table.add_row(name, _fmt_acc(m), f"{m['margin']:+.4f}", f"{m['loss']:.4f}")
        console.print(table)
    console.print(f"[bold green]saved[/] {output_dir} ({results['steps']} steps, {results['train_seconds']} s)")


__all__ = ["train", "reward_loss", "evaluate_reward", "score_batches", "pairwise_summary", "wilson_interval",
           "head_modules"]
