"""GPU QLoRA: Llama-3.2-1B shape (random init), tunelab NF4 (torchao) vs HF Trainer + PEFT + bitsandbytes 4-bit.

One invocation runs, on the same per-step example sets (bench.gpu's log-normal lengths):
  * peer QLoRA: the bf16 random-init model saved and reloaded with ``BitsAndBytesConfig(load_in_4bit,
    bnb_4bit_quant_type=nf4, bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=bf16)``, PEFT LoRA r=16
    all-linear, Trainer padding-free (``DataCollatorWithFlattening``), bf16;
  * tunelab QLoRA: the same bf16 weights, ``quantize_frozen_linears`` (NF4 + double quantization, the
    library's ``model.quantize: nf4``), LoRA r=16 all-linear fp32, packed rows, chunked CE, bf16 autocast;
and prints real tok/s, s/step, peak GiB (``torch.cuda.max_memory_allocated``) side by side.

``--tiny`` runs the same code paths on CPU with a tiny config (the peer row needs CUDA + bitsandbytes and
is skipped there with a note), to check the script before spending device time. Needs ``pip install
'tunelab[bench]' bitsandbytes`` on the GPU machine.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time

import torch

from bench.gpu import IGNORE_INDEX, make_examples, model_config, n_params, summarize, sync, table, train_peer, workload_arguments


def build_bf16_model(cfg, device: torch.device, seed: int, attn: str):
    """Random-init Llama in bf16 on ``device`` (fp32 on CPU), use_cache off."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with device:
        model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = attn
    model.config.use_cache = False
    return model.to(torch.bfloat16) if device.type == "cuda" else model


def run_peer_bnb(examples_per_step, args, cfg, device) -> dict:
    """HF Trainer + PEFT LoRA on a bitsandbytes NF4 base (the standard QLoRA recipe)."""
    if device.type != "cuda":
        raise RuntimeError("the peer (bitsandbytes 4-bit) needs CUDA; skipped in --tiny/CPU runs")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, DataCollatorWithFlattening

    with tempfile.TemporaryDirectory(prefix="gpu-qlora-") as tmp:
        build_bf16_model(cfg, device, args.seed, args.attn).save_pretrained(tmp)
        gc.collect()
        torch.cuda.empty_cache()
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=torch.bfloat16,
                                                     attn_implementation=args.attn, device_map={"": 0})
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.grad_ckpt)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    dataset = [{"input_ids": ids, "labels": labs} for step in examples_per_step for ids, labs in step]
    torch.cuda.reset_peak_memory_stats()
    collator = DataCollatorWithFlattening(separator_id=IGNORE_INDEX, return_tensors="pt")
    times, losses = train_peer(model, dataset, collator, len(examples_per_step[0]), len(examples_per_step), device,
                               args.seed, "/tmp/peer-qlora-out")
    peak = torch.cuda.max_memory_allocated() / 2**30
    n = n_params(model)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return summarize("peer QLoRA (HF + PEFT + bitsandbytes nf4, padding-free)", times, *_token_counts(examples_per_step),
                     losses, peak, n, "lora")


def run_tunelab_qlora(examples_per_step, args, cfg, device) -> dict:
    """tunelab's QLoRA step: NF4 base (torchao), fp32 LoRA, packed rows, chunked CE, autocast."""
    from tunelab.adapters.lora import inject_lora
    from tunelab.config.schema import TrainConfig
    from tunelab.data.collate import num_supervised_tokens, packed_collate
    from tunelab.data.packing import pack_best_fit
    from tunelab.models.causal_lm import lm_loss
    from tunelab.quant.nf4 import NF4Linear, quantize_frozen_linears, quantized_bytes
    from tunelab.recipes.prepare import upcast_trainable
    from tunelab.training.optim import build_optimizer
    from tunelab.training.precision import autocast

    model = build_bf16_model(cfg, device, args.seed, args.attn)
    quantize_frozen_linears(model)
    nf4_gib = sum(quantized_bytes(m.weight) for m in model.modules() if isinstance(m, NF4Linear)) / 2**30
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    inject_lora(model, "all-linear", r=16, alpha=32)
    upcast_trainable(model)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    tc = TrainConfig(lr=2e-4, grad_accum=1, max_grad_norm=1.0, schedule="constant", warmup_steps=0,
                     precision="auto" if device.type == "cuda" else "fp32")
    optimizer = build_optimizer(model, tc)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    batches = []
    for step in examples_per_step:
        rows = pack_best_fit([len(i) for i, _ in step], args.max_len)
        batch = packed_collate([[step[i] for i in row] for row in rows], pad_token_id=0)
        batches.append((batch, num_supervised_tokens(batch["labels"])))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for batch, supervised in batches:
        sync(device)
        started = time.perf_counter()
        tensors = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with autocast(tc.precision, device):
            loss, _ = lm_loss(model, tensors, supervised, chunk_size=args.ce_chunk)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    n = n_params(model)
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summarize("tunelab QLoRA (torchao nf4, packed, chunked CE)", times, *_token_counts(examples_per_step),
                     losses, peak, n, "lora", {"nf4_linear_weights_gib": nf4_gib})


def _token_counts(examples_per_step) -> tuple[list[int], list[int]]:
    real = [sum(len(i) for i, _ in s) for s in examples_per_step]
    sup = [sum(sum(1 for x in lab[1:] if x != IGNORE_INDEX) for _, lab in s) for s in examples_per_step]
    return real, sup


def main(argv=None) -> None:
    """CLI (see module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload_arguments(ap)
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    cfg = model_config(args.tiny)
    examples = make_examples(args.steps * args.per_step, cfg.vocab_size, args.max_len, args.median, args.seed)
    per_step = [examples[i * args.per_step:(i + 1) * args.per_step] for i in range(args.steps)]
    print(f"# GPU QLoRA bench: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch "
          f"{torch.__version__}; python {platform.python_version()}; {time.strftime('%Y-%m-%d')}; {args.steps} steps "
          f"x {args.per_step} sequences, grad ckpt {args.grad_ckpt}", flush=True)
    rows = []
    for name, fn in (("peer", run_peer_bnb), ("tunelab", run_tunelab_qlora)):
        try:
            row = fn(per_step, args, cfg, device)
        except Exception as err:  # one failing side must not lose the other's numbers
            print(f"# {name} FAILED/SKIPPED: {type(err).__name__}: {err}", flush=True)
            continue
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
        rows.append(row)
    print(table(rows))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
