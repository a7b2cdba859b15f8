"""Same-process CPU A/B measurements behind the CPU notes in bench/RESULTS.md.

Usage: ``python -m bench.cpu_ab`` (≈ 5 min on 2 cores; run under ``flock /tmp/tunelab-cpu.lock``).

1. matmul throughput, fp32 vs bf16, at the SmolLM2 MLP shape (rows × 576 → 1,536);
2. SmolLM2-135M + LoRA r=16 forward + backward on one packed row: ``sdpa`` vs ``sdpa_varlen``,
   alternating in one process (min of 4 steps each), fp32;
3. one step's 8 examples (2,530 tokens) as rows ≤ 512 run one by one vs concatenated into one row
   (``sdpa_varlen``), fp32 and bf16 base.
4. ``python -m bench.cpu_ab compile`` only (not in the default run): eager vs ``train.compile``
   (tunelab's per-layer ``torch.compile``, inductor, dynamic shapes) on the same three concatenated
   rows of different lengths (``sdpa_varlen``), fp32 and bf16 base: compile time of the first pass,
   then the min of 2 passes each, and the number of compiled frames after the first and last pass
   (equal = no recompiles). ≈ 3–4 min on 2 cores.
Prints each pair and its ratio. Random token ids (attention and matmul cost do not depend on them).
Sections: ``python -m bench.cpu_ab [matmul] [attention] [flatten] [compile]`` (default: the first three).
"""
from __future__ import annotations

import contextlib
import sys
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


def row_loss(model, batch, bf16: bool) -> float:
    """Loss (nats/token) of one batch, under the same autocast as :func:`step_fn`; no backward."""
    from tunelab.models.causal_lm import lm_loss

    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        return float(lm_loss(model, batch, batch["input_ids"].numel())[0].detach())


def compile_ab() -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    import tunelab.training.compile as compile_module

    rows = [[480, 300], [450, 250, 100], [400, 350, 200]]  # 780, 800 and 950 tokens: a new length every step
    for bf16 in (False, True):
        model = lora_model(bf16)
        batches = [packed(lens) for lens in rows]
        total = sum(sum(lens) for lens in rows)
        one_pass = step_fn(model, batches, bf16)
        eager = best_of(one_pass, 2)
        loss_eager = row_loss(model, batches[0], bf16)
        counter = CompileCounterWithBackend("inductor")
        compile_module.BACKEND = counter
        with compile_module.compiled_layers(model, True):
            start = time.perf_counter()
            one_pass()
            first = time.perf_counter() - start
            frames_first = counter.frame_count
            compiled = best_of(one_pass, 2)
            frames_last = counter.frame_count
            loss_compiled = row_loss(model, batches[0], bf16)  # with grad enabled: the training graph
        model.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        print(f"{'bf16 base' if bf16 else 'fp32'}: 3 rows of 780/800/950 tokens (fwd+bwd), eager {eager:.2f} s "
              f"({total / eager:.0f} tok/s), compiled {compiled:.2f} s ({total / compiled:.0f} tok/s), speed-up "
              f"{eager / compiled:.2f}x; first compiled pass {first:.1f} s (compile included); compiled frames "
              f"{frames_first} after the first pass, {frames_last} after all; loss on row 1 eager "
              f"{loss_eager:.6f} compiled {loss_compiled:.6f}", flush=True)


SECTIONS = {"matmul": matmul_rates, "attention": attention_ab, "flatten": flatten_ab, "compile": compile_ab}


def main() -> None:
    names = sys.argv[1:] or ["matmul", "attention", "flatten"]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, 2 threads")
    for name in names:
        SECTIONS[name]()


if __name__ == "__main__":
    main()
