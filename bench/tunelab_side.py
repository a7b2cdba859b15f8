"""tunelab side of the CPU benchmark: same model, data, LoRA, optimizer, steps and examples per step.

Each optimizer step takes the same example set as the reference peer step (``batch_example_ids``
from the peer run, else a seeded grouping), packs it best-fit-decreasing into rows of at most
``max_len`` tokens with restarting ``position_ids`` (no padding, no cross-example attention), runs
each row as one micro-batch (1 × ≤512 tokens: attention cost stays ≤ 512² per row) and divides the
summed loss by the step's supervised-token count — exactly tunelab's training step, built from the
library's own pieces (data pipeline, LoRA, chunked CE, optimizer, autocast).

Run in a fresh process (``bench.subproc.run_in_subprocess("tunelab", ...)``): peak RSS is the
process's lifetime high-water mark.
"""
from __future__ import annotations

import random
import time

from bench.metrics import GIB, cpu_cores_between, cpu_snapshot, ru_maxrss_bytes, summarize_steps


def run_tunelab(model_dir, data_path, *, steps: int, tokens_per_step: int = 0, examples_per_step: int = 8,
                lora_r: int = 16, lora_alpha: int = 32, lr: float = 2e-4, seed: int = 0, threads: int = 2,
                max_len: int = 512, precision: str = "fp32", batch_example_ids: list[list[int]] | None = None,
                attn_implementation: str = "auto", rows_per_micro_batch: int = 8) -> dict:
    """Train ``steps`` optimizer steps with tunelab; return measurements (times s, rates tok/s, memory GiB).

    ``precision`` 'fp32' = everything fp32; 'bf16' = the library's ``model.dtype: bfloat16`` +
    ``train.precision: bf16``: frozen base weights stored in bf16, fp32 LoRA adapters, bf16 autocast.
    ``attn_implementation`` 'auto' resolves as in the library (``sdpa_varlen`` on CPU); with a varlen
    attention, up to ``rows_per_micro_batch`` packed rows are concatenated into one micro-batch row
    (the library's ``train.batch_size`` rows, flattened); otherwise each ≤ max_len row is its own
    micro-batch.
    """
    import torch

    from tunelab.adapters.lora import inject_lora
    from tunelab.config.schema import DataConfig, DataSource, TrainConfig
    from tunelab.data.collate import num_supervised_tokens, packed_collate
    from tunelab.data.packing import pack_best_fit
    from tunelab.data.pipeline import load_canonical, tokenize_all
    from tunelab.data.tokenize import Tokenizer
    from tunelab.models.causal_lm import lm_loss
    from tunelab.models.attention import VARLEN_ATTENTION, resolve_attn_implementation
    from tunelab.models.loading import load_model, load_tokenizer
    from tunelab.recipes.prepare import upcast_trainable
    from tunelab.training.optim import build_optimizer
    from tunelab.training.precision import autocast

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(str(model_dir))
    data_cfg = DataConfig(train=DataSource(path=str(data_path)), max_seq_len=max_len)
    canonical, _ = load_canonical(data_cfg.train, data_cfg)
    examples, _ = tokenize_all(canonical, Tokenizer(tokenizer, max_len, "truncate", "assistant"))
    pairs = [(e.input_ids, e.labels) for e in examples]
    if batch_example_ids is None:
        order = list(range(len(pairs)))
        random.Random(seed).shuffle(order)
        batch_example_ids = [order[i * examples_per_step:(i + 1) * examples_per_step] for i in range(steps)]
    attn = resolve_attn_implementation(attn_implementation)
    model = load_model(str(model_dir), attn_implementation=attn,
                       dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    inject_lora(model, "all-linear", r=lora_r, alpha=lora_alpha)
    upcast_trainable(model)
    model.train()
    cfg = TrainConfig(lr=lr, weight_decay=0.0, max_grad_norm=1.0, schedule="constant", warmup_steps=0,
                      precision=precision)
    optimizer = build_optimizer(model, cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    device = torch.device("cpu")
    times, real, sup, losses, other_cores = [], [], [], [], []
    for ids in batch_example_ids[:steps]:
        step_pairs = [pairs[i] for i in ids]
        rows = [[step_pairs[i] for i in row] for row in pack_best_fit([len(p[0]) for p in step_pairs], max_len)]
        if attn in VARLEN_ATTENTION:  # as sft_batch_plan(flatten_rows=True) with batch_size = rows_per_micro_batch
            groups = [rows[i:i + rows_per_micro_batch] for i in range(0, len(rows), rows_per_micro_batch)]
            micro = [packed_collate([[ex for row in g for ex in row]], tokenizer.pad_token_id) for g in groups]
        else:
            micro = [packed_collate([row], tokenizer.pad_token_id) for row in rows]
        normalizer = sum(num_supervised_tokens(b["labels"]) for b in micro)
        snap = cpu_snapshot()
        started = time.perf_counter()
        total = 0.0
        for batch in micro:
            with autocast(precision, device):
                loss, _ = lm_loss(model, batch, normalizer)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        other_cores.append(cpu_cores_between(snap, cpu_snapshot())[1])
        real.append(sum(len(p[0]) for p in step_pairs))
        sup.append(normalizer)
        losses.append(total)
    return {"kind": "tunelab", "setting": f"tunelab (packed ≤{max_len}/row, {attn}"
            f"{f', ≤{rows_per_micro_batch} rows/micro-batch flattened' if attn in VARLEN_ATTENTION else ''}, chunked CE, "
            f"{'bf16 base + autocast' if precision == 'bf16' else precision})",
            "correct": True, "steps": steps, **summarize_steps(times, real, sup, losses),
            "peak_rss_gib": ru_maxrss_bytes() / GIB, "losses": losses, "step_times_s": times,
            "precision": precision, "threads": threads, "other_procs_cpu_cores_per_step": other_cores,
            "real_tokens_per_step": real}
