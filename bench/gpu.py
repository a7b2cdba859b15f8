"""GPU setting: Llama-3.2-1B shape (random init), bf16, log-normal lengths; tunelab vs HF Trainer + PEFT.

One invocation runs, in this order and on the same per-step example sets:
  * peer LoRA, dynamic padding        (Trainer + PEFT, bf16 base, fp32 adapters, bf16 autocast)
  * peer LoRA, padding-free           (DataCollatorWithFlattening, use_cache=False)
  * peer full fine-tuning, padding-free (fp32 master weights, bf16 autocast)
  * tunelab LoRA   (packing into rows ≤ max_len with restarting position_ids, chunked CE, bf16 base)
  * tunelab full   (same data path, fp32 master weights, bf16 autocast, fused AdamW)
and prints a table of real tok/s, supervised tok/s, s/step, peak GiB (torch.cuda.max_memory_allocated),
loss after N steps, MFU (6·N FLOPs/token full, 4·N LoRA, against 790 TFLOP/s bf16) and ratios.

Random weights (real weights do not fit the device's transfer limit): losses start near ln(vocab)
and the comparison is about speed/memory on identical work. ``--tiny`` runs the same code paths on
CPU with a tiny config, to check the script before spending device time.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import time

import torch

IGNORE_INDEX = -100
BASE_BF16 = [True]  # --lora-base fp32 keeps the frozen LoRA base in fp32 (autocast casts it)
PEAK_TFLOPS = 790.0


def model_config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           tie_word_embeddings=True)
    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                       tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5)


def make_examples(n: int, vocab: int, max_len: int, median: float, seed: int) -> list[tuple[list[int], list[int]]]:
    """Random token sequences with log-normal lengths (sigma 0.8) clipped to [16, max_len]; the
    first 30–60% of each sequence is an unsupervised "prompt"."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(median) + 0.8 * torch.randn(n, generator=gen)).round().clamp(16, max_len).long()
    out = []
    for length in lengths.tolist():
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        prompt = int(length * (0.3 + 0.3 * torch.rand(1, generator=gen).item()))
        out.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def build_model(cfg, method: str, device: torch.device, seed: int, attn: str):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with device:
        model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = attn
    model.config.use_cache = False
    if method == "lora" and device.type == "cuda" and BASE_BF16[0]:
        model.to(torch.bfloat16)  # frozen base in bf16; adapters stay fp32 (autocast does the casts)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def n_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def summarize(name, step_s, real, sup, losses, peak_gib, n, method, extra=None):
    skip = 1 if len(step_s) > 1 else 0
    secs = sum(step_s[skip:])
    tok_s = sum(real[skip:]) / secs
    flops_per_token = (6 if method == "full" else 4) * n
    row = {"setting": name, "method": method, "real_tok_s": tok_s, "supervised_tok_s": sum(sup[skip:]) / secs,
           "s_per_step": secs / len(step_s[skip:]), "peak_gib": peak_gib, "final_loss": losses[-1],
           "losses": losses, "mfu": tok_s * flops_per_token / (PEAK_TFLOPS * 1e12)}
    row.update(extra or {})
    return row


def train_peer(model, dataset, collator, batch_size: int, steps: int, device, seed: int,
               out_dir: str) -> tuple[list[float], list[float]]:
    """Train ``model`` with HF Trainer as the peer stack does (same example order as tunelab: no shuffling;
    AdamW 2e-4 constant, clip 1.0, bf16 autocast on CUDA); returns the per-step seconds and logged losses."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Sequential(Trainer):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    times, losses = [], []

    class Meter(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(device)
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(device)
            times.append(time.perf_counter() - self.t)

        def on_log(self, a, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    targs = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch_size, max_steps=steps,
                              learning_rate=2e-4, logging_steps=1, report_to=[], save_strategy="no",
                              bf16=device.type == "cuda", use_cpu=device.type != "cuda", dataloader_num_workers=0,
                              lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                              remove_unused_columns=False, disable_tqdm=True, seed=seed)
    Sequential(model=model, args=targs, train_dataset=dataset, data_collator=collator, callbacks=[Meter()]).train()
    return times, losses


def run_peer(examples_per_step, mode, method, args, cfg, device):
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, PreTrainedTokenizerFast

    model = build_model(cfg, method, device, args.seed, args.attn)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    flat = [ex for step in examples_per_step for ex in step]
    dataset = [{"input_ids": ids, "labels": labs} for ids, labs in flat]
    if mode == "padding":
        from tokenizers import Tokenizer, models

        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, unk_token="<pad>")),
                                      pad_token="<pad>")
        inner = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")
    else:
        inner = DataCollatorWithFlattening(separator_id=IGNORE_INDEX, return_tensors="pt")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = train_peer(model, dataset, inner, len(examples_per_step[0]), len(examples_per_step), device,
                               args.seed, "/tmp/peer-out")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    real = [sum(len(i) for i, _ in s) for s in examples_per_step]
    sup = [sum(sum(1 for x in l[1:] if x != IGNORE_INDEX) for _, l in s) for s in examples_per_step]
    n = n_params(model)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summarize(f"peer {method} ({mode})", times, real, sup, losses, peak, n, method)


def run_tunelab(examples_per_step, method, args, cfg, device):
    from tunelab.adapters.lora import inject_lora
    from tunelab.config.schema import TrainConfig
    from tunelab.data.collate import num_supervised_tokens, packed_collate
    from tunelab.data.packing import pack_best_fit
    from tunelab.models.causal_lm import lm_loss
    from tunelab.training.optim import build_optimizer
    from tunelab.training.precision import autocast

    model = build_model(cfg, method, device, args.seed, args.attn)
    if method == "lora":
        inject_lora(model, "all-linear", r=16, alpha=32)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    tc = TrainConfig(method=method, lr=2e-4, grad_accum=1, max_grad_norm=1.0, schedule="constant", warmup_steps=0,
                     precision="auto" if device.type == "cuda" else "fp32")
    optimizer = build_optimizer(model, tc)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    step_fn = model
    if args.compile:
        step_fn = torch.compile(model)
    batches = []
    for step in examples_per_step:
        rows = pack_best_fit([len(i) for i, _ in step], args.max_len)
        batch = packed_collate([[step[i] for i in row] for row in rows], pad_token_id=0)
        batch["num_tokens"] = sum(len(i) for i, _ in step)
        batch["num_supervised"] = num_supervised_tokens(batch["labels"])
        batches.append(batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    prof = None
    if args.profile and device.type == "cuda":
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                  torch.profiler.ProfilerActivity.CUDA])
    for i, batch in enumerate(batches):
        if prof is not None and i == len(batches) - 3:
            prof.__enter__()
        sync(device)
        t = time.perf_counter()
        # one optimizer step exactly as tunelab's loop does it (single micro-batch, token-normalized)
        tensors = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with autocast(tc.precision, device):
            loss, _ = lm_loss(step_fn, tensors, batch["num_supervised"], chunk_size=args.ce_chunk)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    if prof is not None:
        prof.__exit__(None, None, None)
        print(f"# profile {method} (last 3 steps)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    real = [b["num_tokens"] for b in batches]
    sup = [b["num_supervised"] for b in batches]
    n = n_params(model)
    rows = [b["input_ids"].shape for b in batches]
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summarize(f"tunelab {method}", times, real, sup, losses, peak, n, method,
                     {"row_shapes_first": [list(s) for s in rows[:3]]})


def table(rows):
    best = {m: max((r for r in rows if r["setting"].startswith("peer") and r["method"] == m),
                   key=lambda r: r["real_tok_s"], default=None) for m in ("lora", "full")}
    lines = ["| setting | real tok/s | supervised tok/s | s/step | peak GiB | loss@N | MFU | tok/s ÷ best peer | mem ÷ best peer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = best.get(r["method"])
        ratio = f"{r['real_tok_s'] / ref['real_tok_s']:.2f}×" if ref else "-"
        mem = f"{r['peak_gib'] / ref['peak_gib']:.2f}×" if ref and ref["peak_gib"] == ref["peak_gib"] else "-"
        lines.append(f"| {r['setting']} | {r['real_tok_s']:.0f} | {r['supervised_tok_s']:.0f} | {r['s_per_step']:.3f} | "
                     f"{r['peak_gib']:.1f} | {r['final_loss']:.4f} | {100 * r['mfu']:.1f}% | {ratio} | {mem} |")
    return "\n".join(lines)


def workload_arguments(ap: argparse.ArgumentParser) -> None:
    """The options both GPU benchmarks share: model size (--tiny), steps, the synthetic batch (examples per
    step, max/median length in tokens, seed), attention, CE chunk, activation checkpointing."""
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--per-step", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--median", type=float, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--ce-chunk", type=int, default=4096)
    ap.add_argument("--grad-ckpt", action="store_true")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload_arguments(ap)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table for tunelab runs")
    ap.add_argument("--lora-base", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--sdpa-backend", default="default", choices=["default", "no-cudnn"],
                    help="no-cudnn: disable the cuDNN SDPA backend (masked packed attention then uses the "
                         "memory-efficient kernel)")
    ap.add_argument("--only", default="peer-lora-padding,peer-lora-padding_free,peer-full-padding_free,tunelab-lora,tunelab-full")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    BASE_BF16[0] = args.lora_base == "bf16"
    if args.sdpa_backend == "no-cudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    cfg = model_config(args.tiny)
    examples = make_examples(args.steps * args.per_step, cfg.vocab_size, args.max_len, args.median, args.seed)
    per_step = [examples[i * args.per_step:(i + 1) * args.per_step] for i in range(args.steps)]
    lengths = sorted(len(i) for i, _ in examples)
    print(f"# GPU bench: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"python {platform.python_version()}; {time.strftime('%Y-%m-%d')}")
    print(f"# lengths: min {lengths[0]} median {lengths[len(lengths) // 2]} max {lengths[-1]} "
          f"mean {sum(lengths) / len(lengths):.0f}; {args.steps} steps × {args.per_step} sequences", flush=True)
    rows, default_attn = [], args.attn
    for item in args.only.split(","):
        spec, _, attn = item.partition("@")  # e.g. tunelab-lora@flex_attention
        args.attn = attn or default_attn
        side, method, *mode = spec.split("-")
        try:
            row = (run_peer(per_step, mode[0], method, args, cfg, device) if side == "peer"
                   else run_tunelab(per_step, method, args, cfg, device))
        except Exception as err:  # keep going: one failing setting must not lose the others' numbers
            print(f"# {item} FAILED: {type(err).__name__}: {err}", flush=True)
            continue
        if attn:
            row["setting"] += f" [{attn}]"
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
        rows.append(row)
    print(table(rows))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
