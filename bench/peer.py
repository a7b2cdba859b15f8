"""Peer side: Hugging Face ``transformers.Trainer`` + PEFT LoRA, fp32 on CPU.

Two modes over identical data/order/hyper-parameters:

* ``padding``: dynamic right padding per batch (``DataCollatorForSeq2Seq``, labels padded -100).
* ``padding_free``: ``DataCollatorWithFlattening`` packs the batch into one [1, T] row with
  ``position_ids`` restarting at 0 per example; the model derives a block-diagonal causal mask
  from those ``position_ids`` ONLY when there is no attention_mask AND no KV cache
  (``transformers.masking_utils._preprocess_mask_arguments``). If ``use_cache`` is on, a
  ``DynamicCache`` is created in the forward, the packed-sequence mask is skipped and examples
  attend to each other (silently wrong loss). So ``model.config.use_cache = False`` and
  ``TrainingArguments(use_cache=False)`` (Trainer copies ``args.use_cache`` into the config).
  A packed-vs-separate logits check runs before training and sets ``correct``.

Must run in a fresh process (``ru_maxrss`` is a lifetime high-water mark): use
``bench.subproc.run_in_subprocess("peer", ...)`` or ``python -m bench.peer ...`` (prints one JSON line).
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time

from bench.chat_tokens import IGNORE_INDEX, encode_file
from bench.metrics import (GIB, cpu_cores_between, cpu_snapshot, fingerprint, rss_bytes, ru_maxrss_bytes,
                           summarize_steps)

MODES = ("padding", "padding_free")
CHECK_TOL = 1e-3  # max |logit diff| between batched and per-example forward, fp32


class RecordingCollator:
    """Wraps a collator; drops ``idx`` and records per-batch example ids and token counts."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[dict] = []

    def __call__(self, features):
        ids = [f["idx"] for f in features]
        feats = [{k: v for k, v in f.items() if k != "idx"} for f in features]
        batch = self.inner(feats)
        self.batches.append({
            "idx": ids,
            "real": sum(len(f["input_ids"]) for f in feats),
            "supervised": sum(sum(1 for x in f["labels"] if x != IGNORE_INDEX) for f in feats),
            "computed": int(batch["input_ids"].numel()),  # tokens actually run (incl. pads)
        })
        return batch


def make_collator(mode: str, tokenizer):
    """Inner collator for ``mode`` (see module docstring)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if mode == "padding":
        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                      return_tensors="pt")
    if mode == "padding_free":
        return DataCollatorWithFlattening(separator_id=IGNORE_INDEX, return_tensors="pt")
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def packing_check(model, collator, examples, n: int = 3, length: int = 64) -> float:
    """Max |logit difference| (fp32) between one collated batch and each example run alone.

    Uses the first ``n`` examples truncated to ``length``, ``length - length//(2n)``, ... tokens
    (different lengths, so padding/packing boundaries are really exercised); train mode, no grad.
    """
    import torch

    cuts = [max(2, length - k * (length // (2 * n))) for k in range(n)]
    feats = [{"input_ids": e["input_ids"][:c], "labels": e["labels"][:c]} for e, c in zip(examples[:n], cuts)]
    batch = collator([dict(f) for f in feats])
    batch.pop("labels", None)
    was_training = model.training
    model.train()
    worst = 0.0
    with torch.no_grad():
        logits = model(**batch).logits
        packed = logits.shape[0] == 1 and len(feats) > 1
        offset = 0
        for row, f in enumerate(feats):
            ref = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            L = len(f["input_ids"])
            got = logits[0, offset:offset + L] if packed else logits[row, :L]
            offset += L
            worst = max(worst, (got - ref).abs().max().item())
    model.train(was_training)
    return worst


class StepMeter:
    """TrainerCallback body: wall time between consecutive step ends, loss per step, RSS samples."""

    def __init__(self):
        self.t_prev = None
        self.step_times: list[float] = []
        self.losses: dict[int, float] = {}
        self.grad_norms: dict[int, float] = {}
        self.rss_peak = 0
        self.cpu_prev = None
        self.own_cores: list[float] = []
        self.other_cores: list[float] = []

    def on_train_begin(self, args, state, control, **kw):
        self.cpu_prev = cpu_snapshot()
        self.t_prev = self.cpu_prev[0]

    def on_step_end(self, args, state, control, **kw):
        snap = cpu_snapshot()
        now = snap[0]
        self.step_times.append(now - self.t_prev)
        own, other = cpu_cores_between(self.cpu_prev, snap)
        self.own_cores.append(own)
        self.other_cores.append(other)
        self.t_prev, self.cpu_prev = now, snap
        self.rss_peak = max(self.rss_peak, rss_bytes())
        print(f"[peer] step {state.global_step}: {self.step_times[-1]:.2f} s, cores own {own:.2f} "
              f"other {other:.2f}", file=sys.stderr, flush=True)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses[state.global_step] = float(logs["loss"])
            if "grad_norm" in logs:
                self.grad_norms[state.global_step] = float(logs["grad_norm"])


def _callback(meter: StepMeter):
    """Wrap ``meter`` in a real ``TrainerCallback`` subclass."""
    from transformers import TrainerCallback

    return type("StepMeterCallback", (TrainerCallback,), {
        "on_train_begin": lambda self, *a, **k: meter.on_train_begin(*a, **k),
        "on_step_end": lambda self, *a, **k: meter.on_step_end(*a, **k),
        "on_log": lambda self, *a, **k: meter.on_log(*a, **k),
    })()


def _load_lora_model(model_dir, lora_r: int, lora_alpha: int, use_dora: bool = False):
    """fp32 base model + PEFT LoRA (or DoRA) on all linear layers (lm_head excluded by PEFT), use_cache off."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False  # required for padding-free correctness (see module docstring)
    cfg = LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=lora_r,
                     lora_alpha=lora_alpha, lora_dropout=0.0, bias="none", use_dora=use_dora)
    return get_peft_model(model, cfg)


def _training_args(out_dir, *, steps, examples_per_step, lr, seed):
    """TrainingArguments shared by both modes (constant LR, AdamW default, clip 1.0, no saving)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=examples_per_step, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        logging_strategy="steps", logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
        dataloader_num_workers=0, dataloader_pin_memory=False, use_cpu=True, bf16=False, fp16=False,
        seed=seed, data_seed=seed, remove_unused_columns=False, label_names=["labels"],
        disable_tqdm=True, use_cache=False,
    )


def _versions() -> dict:
    """Library versions relevant to the measurement."""
    import peft
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def _checks(model, collator, examples, mode: str) -> dict:
    """Correctness pre-flight (see ``packing_check``); for padding_free also shows the use_cache trap."""
    out = {"check_max_abs_logit_diff": packing_check(model, collator, examples)}
    if mode == "padding_free":
        cfg = model.get_base_model().config
        cfg.use_cache = True
        out["check_with_use_cache_true_max_abs_logit_diff"] = packing_check(model, collator, examples)
        cfg.use_cache = False
    out["correct"] = out["check_max_abs_logit_diff"] < CHECK_TOL
    return out


def run_peer(model_dir, data_path, *, mode: str, steps: int, examples_per_step: int = 8, lora_r: int = 16,
             lora_alpha: int = 32, lr: float = 2e-4, seed: int = 0, threads: int = 2, max_len: int = 512,
             use_dora: bool = False, eval_data_path: str | None = None) -> dict:
    """Train ``steps`` optimizer steps with HF Trainer + PEFT LoRA; return measurements (JSON-able dict).

    ``use_dora``: PEFT's DoRA instead of LoRA. ``eval_data_path``: also report ``held_out_loss``
    (nats per supervised token over that JSONL, after training).

    Times in seconds, rates in tokens/s, memory in GiB. Step 1 is excluded from rates (warm-up).
    Call in a fresh process so ``peak_rss_gib`` (ru_maxrss) belongs to this run only.
    """
    import torch
    from transformers import AutoTokenizer, Trainer, set_seed

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "right"
    examples, dropped = encode_file(tok, data_path, max_len)
    set_seed(seed)
    model = _load_lora_model(model_dir, lora_r, lora_alpha, use_dora)
    collator, meter = RecordingCollator(make_collator(mode, tok)), StepMeter()
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-peer-") as out_dir:
        args = _training_args(out_dir, steps=steps, examples_per_step=examples_per_step, lr=lr, seed=seed)
        trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collator,
                          processing_class=tok, callbacks=[_callback(meter)])
        checks = _checks(trainer.model, collator.inner, examples, mode)
        setup_s = time.perf_counter() - t0
        trainer.train()
    held_out = held_out_loss(model, encode_file(tok, eval_data_path, max_len)[0]) if eval_data_path else None
    config = {"lora_r": lora_r, "lora_alpha": lora_alpha, "lora_dropout": 0.0, "target_modules": "all-linear",
              "lr": lr, "lr_scheduler": "constant", "optim": getattr(args.optim, "value", str(args.optim)),
              "weight_decay": 0.0, "max_grad_norm": args.max_grad_norm, "dtype": "float32", "threads": threads,
              "max_len": max_len, "seed": seed, "data_path": str(data_path), "model_dir": str(model_dir),
              "examples": len(examples), "examples_dropped_over_max_len": dropped, "setup_s": setup_s,
              "shuffle": f"Trainer RandomSampler (train_sampling_strategy={args.train_sampling_strategy}), "
                         f"seed=data_seed={seed}; identical order across modes iff batch_fingerprint matches"}
    method = "DoRA" if use_dora else "LoRA"
    return {"kind": "peer", "setting": f"peer: HF Trainer + PEFT {method} ({mode})", "mode": mode, **checks,
            "held_out_loss": held_out,
            "steps": steps, "examples_per_step": examples_per_step,
            **_measurements(meter, collator.batches[:steps], steps), **_model_facts(model),
            "config": config, "versions": _versions(), "notes": NOTES}


NOTES = ["rates exclude step 1 (warm-up); step time = wall time between consecutive Trainer on_step_end "
         "callbacks (includes collation, fwd, bwd, clip, AdamW, logging)",
         "peak_rss_gib = getrusage ru_maxrss (process lifetime, incl. model load)",
         "padding_free needs use_cache=False: a KV cache disables the packed-sequence mask in "
         "transformers 5.x masking_utils so packed examples would attend to each other"]


def held_out_loss(model, examples: list[dict]) -> float:
    """Mean cross-entropy (nats) over the supervised tokens of ``examples`` (``input_ids``/``labels``
    lists, -100 = ignored), one example per forward, eval mode, no grad."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            target = labels[0, 1:]
            total += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX,
                                                             reduction="sum"))
            count += int((target != IGNORE_INDEX).sum())
    return total / max(count, 1)


def _measurements(meter: StepMeter, batches: list[dict], steps: int) -> dict:
    """Per-step lists plus ``summarize_steps`` aggregates (s, tokens/s) and memory (GiB)."""
    losses = [meter.losses.get(s) for s in range(1, steps + 1)]
    real = [b["real"] for b in batches]
    sup = [b["supervised"] for b in batches]
    ids = [b["idx"] for b in batches]
    return {**summarize_steps(meter.step_times, real, sup, losses),
            "peak_rss_gib": ru_maxrss_bytes() / GIB, "rss_sampled_peak_gib": meter.rss_peak / GIB,
            "step_times_s": meter.step_times, "losses": losses,
            "grad_norms": [meter.grad_norms.get(s) for s in range(1, steps + 1)],
            "own_cpu_cores_per_step": meter.own_cores, "other_procs_cpu_cores_per_step": meter.other_cores,
            "real_tokens_per_step": real, "supervised_tokens_per_step": sup,
            "computed_tokens_per_step": [b["computed"] for b in batches],
            "batch_example_ids": ids, "batch_fingerprint": fingerprint(ids)}


def _model_facts(model) -> dict:
    """Parameter counts and attention/caching settings actually in effect."""
    trainable, total = model.get_nb_trainable_parameters()
    cfg = model.get_base_model().config
    return {"trainable_params": trainable, "total_params": total, "use_cache": bool(cfg.use_cache),
            "attn_implementation": cfg._attn_implementation}


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m bench.peer --mode padding --steps 4 ... ; prints exactly one JSON line on stdout."""
    from bench.subproc import emit_json_result

    ap = argparse.ArgumentParser(description="HF Trainer + PEFT LoRA peer benchmark (one run)")
    ap.add_argument("--model-dir", default=None, help="default: bench.assets.smollm2_dir()")
    ap.add_argument("--data", default="bench/out/sharegpt512.jsonl")
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--steps", type=int, required=True)
    for name, typ, default in (("examples-per-step", int, 8), ("lora-r", int, 16), ("lora-alpha", int, 32),
                               ("lr", float, 2e-4), ("seed", int, 0), ("threads", int, 2), ("max-len", int, 512)):
        ap.add_argument(f"--{name}", type=typ, default=default)
    a = ap.parse_args(argv)
    if a.model_dir is None:
        from bench.assets import smollm2_dir

        a.model_dir = str(smollm2_dir())
    kwargs = {k: v for k, v in vars(a).items() if k not in ("model_dir", "data")}
    emit_json_result(run_peer, a.model_dir, a.data, **kwargs)


if __name__ == "__main__":
    main()
