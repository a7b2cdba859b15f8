"""Same-process CPU A/B measurements behind the CPU notes in bench/RESULTS.md.

Usage: ``python -m bench.cpu_ab`` (≈ 5 min on 2 cores; run under ``flock /tmp/tunelab-cpu.lock``).

1. matmul throughput, fp32 vs bf16, at the SmolLM2 MLP shape (rows × 576 → 1,536);
2. SmolLM2-135M + LoRA r=16 forward + backward on one packed row: ``sdpa`` vs ``sdpa_varlen``,
   alternating in one process (min of 4 steps each), fp32;
3. one step's 8 examples (2,530 tokens) as rows ≤ 512 run one by one vs concatenated into one row
   (``sdpa_varlen``), fp32 and bf16 base.
Prints each pair and its ratio. Random token ids (attention and matmul cost do not depend on them).
"""
from __future__ import annotations

import contextlib
import time

import torch


def best_of(fn, reps: int) -> float:
    """Minimum wall time (s) of ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_rates() -> None:
    for rows in (512, 2560):
        rates = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, w = torch.randn(rows, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
            rates[dtype] = 2 * rows * 576 * 1536 / best_of(lambda: torch.nn.functional.linear(a, w), 10) / 1e9
        print(f"matmul {rows}x576x1536: fp32 {rates[torch.float32]:.0f} GFLOP/s, bf16 {rates[torch.bfloat16]:.0f} "
              f"GFLOP/s, ratio {rates[torch.bfloat16] / rates[torch.float32]:.1f}x", flush=True)


def lora_model(bf16: bool):
    from bench.assets import smollm2_dir
    from tunelab.adapters.lora import inject_lora
    from tunelab.models.loading import load_model
    from tunelab.recipes.prepare import upcast_trainable

    torch.manual_seed(0)
    model = load_model(str(smollm2_dir()), attn_implementation="sdpa_varlen",
                       dtype=torch.bfloat16 if bf16 else torch.float32)
    inject_lora(model, "all-linear", r=16, alpha=32)
    upcast_trainable(model)
    return model.train()


def packed(lens: list[int]) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 49152, (1, sum(lens)))
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.cat([torch.arange(n) for n in lens])[None]}


def step_fn(model, batches, bf16: bool):
    from tunelab.models.causal_lm import lm_loss

    total = sum(b["input_ids"].numel() for b in batches)

    def run():
        for batch in batches:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with ctx:
                loss, _ = lm_loss(model, batch, total)
            loss.backward()
    return run


def attention_ab() -> None:
    model = lora_model(bf16=False)
    for lens in ([512], [318], [300, 200], [200, 180, 132]):
        batch = packed(lens)
        times = {}
        for attn in ("sdpa", "sdpa_varlen"):
            model.config._attn_implementation = attn
            times[attn] = best_of(step_fn(model, [batch], False), 4)
        print(f"attention, fp32, row {lens}: sdpa {times['sdpa']:.2f} s, sdpa_varlen {times['sdpa_varlen']:.2f} s, "
              f"speed-up {times['sdpa'] / times['sdpa_varlen']:.2f}x", flush=True)


def flatten_ab() -> None:
    from tunelab.data.packing import pack_best_fit

    lens = [480, 450, 400, 350, 300, 250, 200, 100]
    rows = pack_best_fit(lens, 512)
    for bf16 in (False, True):
        model = lora_model(bf16)
        per_row = [packed([lens[i] for i in row]) for row in rows]
        one = [packed(lens)]
        t_rows = best_of(step_fn(model, per_row, bf16), 3)
        t_one = best_of(step_fn(model, one, bf16), 3)
        print(f"{'bf16 base' if bf16 else 'fp32'}: {len(rows)} rows ≤512 one by one {t_rows:.2f} s, one 2,530-token "
              f"row {t_one:.2f} s, speed-up {t_rows / t_one:.2f}x", flush=True)


def main() -> None:
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, 2 threads")
    matmul_rates()
    attention_ab()
    flatten_ab()


if __name__ == "__main__":
    main()
