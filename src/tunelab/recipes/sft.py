"""Supervised fine-tuning (and continued pre-training on raw text) of a causal LM.

format → template → tokenize → pack/collate → model → chunked CE loss → AdamW step.
Reports held-out loss/perplexity before and after, and the starting and fine-tuned model's
answers to a few held-out prompts side by side.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tunelab.config.load import dump_config
from tunelab.config.schema import Config
from tunelab.errors import DataError
from tunelab.data.batching import sft_batch_plan
from tunelab.data.pipeline import prepare_data
from tunelab.data.templates import resolve_chat_template
from tunelab.eval.report import print_side_by_side
from tunelab.eval.perplexity import evaluate_lm
from tunelab.eval.next_line import next_line_cases, next_line_exact_match
from tunelab.models.attention import VARLEN_ATTENTION
from tunelab.models.causal_lm import lm_loss
from tunelab.models.generate import generate_replies
from tunelab.models.lineage import start_lineage
from tunelab.models.run import load_start_tokenizer, load_weights, save_run, whole_state_dict
from tunelab.models.vocab import add_special_tokens, resize_for_tokenizer
from tunelab.recipes.prepare import (
    before_training, configure_attention_backends, count_parameters, quantize_base, setup_trainable, start_run,
    weights_dtype,
)
from tunelab.training.loop import fit, selection_results
from tunelab.training.metrics import plot_loss_curve
from tunelab.training.outputs import holds_run_lock


@holds_run_lock  # checks and locks output_dir for the whole run (training/outputs/)
def train(config: Config, *, resume: bool | str | None = None, overwrite: bool = False,
          console: Console | None = None) -> dict[str, Any]:
    """Run SFT as configured; returns the before/after results also stored in ``tunelab.json``."""
    runtime, console, resume_from = start_run(config, resume, overwrite, console)  # torchrun: one call per rank
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    configure_attention_backends(config)
    device = runtime.device
    config_yaml = dump_config(config)

    lineage = start_lineage(config.model.name_or_path, output_dir)  # an earlier run as the start (stage chaining)
    tokenizer = load_start_tokenizer(config.model.name_or_path, trust_remote_code=config.model.trust_remote_code,
                                     revision=config.model.revision)
    resolve_chat_template(tokenizer, config.model.chat_template, config.data.system_prompt)
    added = add_special_tokens(tokenizer, config.model.add_special_tokens)
    data = prepare_data(config.data, tokenizer, config.train.seed)
    console.print(f"[bold]data[/] format={data.format} train={data.train_stats.summary()}")
    if data.validation:
        console.print(f"[bold]data[/] held-out={data.validation_stats.summary()}")

    model = load_weights(config.model.name_or_path, trust_remote_code=config.model.trust_remote_code,
                         allow_pickle=config.model.allow_pickle, revision=config.model.revision,
                         attn_implementation=config.model.attn_implementation,
                         dtype=weights_dtype(config, device)).to(device)
    vocab_modules = resize_for_tokenizer(model, tokenizer, added)
    quantize_base(model, config.model.quantize, exclude=vocab_modules)  # QLoRA: "before", probe, reference see the NF4 base
    if added:
        console.print(f"[bold]tokens[/] added {added}; embeddings resized to {len(tokenizer)} rows (mean-initialised)")
    tc = config.train
    flatten_rows = model.config._attn_implementation in VARLEN_ATTENTION  # one row per micro-batch, no padding
    eval_batches = sft_batch_plan(data.validation, batch_size=config.eval.batch_size,
                                  max_seq_len=config.data.max_seq_len, packing=config.data.packing, shuffle=False,
                                  seed=0, pad_token_id=tokenizer.pad_token_id,
                                  flatten_rows=flatten_rows).make_epoch(0) if data.validation else []

    def evaluate() -> dict[str, float]:
        return evaluate_lm(model, eval_batches, device, precision=tc.precision, chunked=tc.chunked_ce,
                           chunk_size=tc.ce_chunk_size)

    prompts = _sample_prompts(data.validation_examples, config.eval.sample_questions)
    lines = _next_line_cases(data.validation_examples, config)

    def next_line() -> dict[str, Any] | None:
        return next_line_exact_match(model, tokenizer, lines, max_new_tokens=config.eval.max_new_tokens,
                                     max_prompt_tokens=max(config.data.max_seq_len - config.eval.max_new_tokens, 8),
                                     batch_size=config.eval.batch_size) if lines else None

    kept = before_training(output_dir, resume_from, lambda: {
        "held_out_before": evaluate() if eval_batches and config.eval.before_training else None,
        "next_line_before": next_line() if config.eval.before_training else None,
        "answers_before": _answers(model, tokenizer, prompts, config)}, write=runtime.is_main)
    before, answers_before = kept.get("held_out_before"), kept.get("answers_before") or []
    if kept.get("next_line_before"):
        console.print(f"[bold]before[/] next-line exact match {kept['next_line_before']['next_line_exact_match']:.4f} "
                      f"on {kept['next_line_before']['num_lines']} held-out lines")
    if before:
        console.print(f"[bold]before[/] held-out loss {before['loss']:.4f}  ppl {before['ppl']:.2f}")

    setup_trainable(model, config, modules_to_save=vocab_modules)
    trainable, total = count_parameters(model)
    console.print(f"[bold]model[/] {config.model.name_or_path}: {trainable:,} trainable of {total:,} parameters "
                  f"({tc.method}), device {device}")
    plan = sft_batch_plan(data.train, batch_size=tc.batch_size, max_seq_len=config.data.max_seq_len,
                          packing=config.data.packing, shuffle=config.data.shuffle, seed=tc.seed,
                          pad_token_id=tokenizer.pad_token_id, flatten_rows=flatten_rows)
    result = fit(
        model, plan, lambda m, b, n: lm_loss(m, b, n, chunked=tc.chunked_ce, chunk_size=tc.ce_chunk_size,
                                         label_smoothing=tc.label_smoothing),
        lambda b: b["num_supervised"], tc, output_dir, config_yaml,
        evaluate=evaluate if eval_batches else None, resume_from=resume_from, device=device, runtime=runtime,
    )
    after = result.held_out()  # the best evaluation's with train.metric_for_best (its weights are saved)
    after = {k: after[k] for k in ("loss", "ppl", "token_accuracy")} if after else None
    with runtime.full_weights():  # FSDP: gather the shards so the model generates and saves as a whole
        answers_after = _answers(model, tokenizer, prompts, config)
        next_line_after = next_line()

    results = {"train": data.train_stats.summary(), "held_out_before": before, "held_out_after": after,
               **({"held_out_data": data.validation_stats.summary(), "next_line_before": kept.get("next_line_before"),
                   "next_line_after": next_line_after} if lines else {}),
               "steps": result.state.step, **selection_results(result, tc),
               "train_seconds": round(time.perf_counter() - started, 1),
               "samples": [{"prompt": p[-1]["content"], "before": b, "after": a}
                           for p, b, a in zip(prompts, answers_before or [None] * len(prompts), answers_after)]}
    model.train(False)
    weights = whole_state_dict(model) if tc.method != "lora" else None  # FSDP full fine-tune: gathered (collective)
    with runtime.full_weights():
        if runtime.is_main:
            save_run(output_dir, model, tokenizer, method=tc.method, base_model=config.model.name_or_path,
                     config_yaml=config_yaml, results=results, lineage=lineage,
                     modules_to_save=vocab_modules if tc.method == "lora" else [], state_dict=weights)
    if runtime.is_main:
        plot_loss_curve(result.history, output_dir / "loss_curve.png", title=f"SFT {config.model.name_or_path}")
    _report(console, results, output_dir)
    runtime.close()
    return results


def _sample_prompts(examples: list[dict[str, Any]], n: int) -> list[list[dict[str, str]]]:
    """The first ``n`` distinct held-out prompts (conversation up to its last assistant turn); ``n = 0``: none."""
    prompts: list[list[dict[str, str]]] = []
    for example in examples:
        if len(prompts) >= n:
            break
        messages = example.get("messages")
        if not messages:
            continue
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
        if last > 0 and messages[:last] not in prompts:
            prompts.append(messages[:last])
    return prompts


def _next_line_cases(examples: list[dict[str, Any]], config: Config) -> list:
    """The fixed held-out lines of ``eval.next_line_samples`` (none when 0).

    Raises:
        DataError: next-line eval asked for, but no held-out document is Python with a function body.
    """
    n = config.eval.next_line_samples
    if n == 0:
        return []
    cases = next_line_cases([e for e in examples if "text" in e], n)
    if not cases:
        raise DataError(f"eval.next_line_samples={n}: no held-out document of data.validation / data.val_fraction "
                        "is Python source with a function body to take lines from (the eval reads raw-text data)")
    return cases


def _answers(model, tokenizer, prompts, config: Config) -> list[str]:
    if not prompts or not tokenizer.chat_template:
        return []
    return generate_replies(model, tokenizer, prompts, max_new_tokens=config.eval.max_new_tokens)


def _report(console: Console, results: dict[str, Any], output_dir: Path) -> None:
    before, after = results["held_out_before"], results["held_out_after"]
    if after:
        table = Table(title="held-out loss (nats/token), perplexity and token accuracy")
        for col in ("", "loss", "perplexity", "token accuracy"):
            table.add_column(col)
        acc = {name: f"{m['token_accuracy']:.4f}" if "token_accuracy" in m else "-"
               for name, m in (("before", before or {}), ("after", after))}
        if before:
            table.add_row("before", f"{before['loss']:.4f}", f"{before['ppl']:.2f}", acc["before"])
        table.add_row("after", f"{after['loss']:.4f}", f"{after['ppl']:.2f}", acc["after"])
        if before:
            table.add_row("change", f"{after['loss'] - before['loss']:+.4f}",
                          f"{after['ppl'] / before['ppl']:.2f}×", "")
        console.print(table)
    if results.get("next_line_after"):
        nb, na = results.get("next_line_before"), results["next_line_after"]
        console.print(f"[bold]next-line exact match[/] on {na['num_lines']} held-out lines: "
                      + (f"before {nb['next_line_exact_match']:.4f} ({nb['num_correct']}), " if nb else "")
                      + f"after {na['next_line_exact_match']:.4f} ({na['num_correct']})")
    print_side_by_side(console, results["samples"], "held-out questions: starting model vs fine-tuned", "question")
    console.print(f"[bold green]saved[/] {output_dir} ({results['steps']} steps, {results['train_seconds']} s)")
