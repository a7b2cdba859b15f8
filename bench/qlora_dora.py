"""LoRA vs QLoRA (NF4 base) vs DoRA on the quickstart, against HF Trainer + PEFT LoRA/DoRA, one invocation.

Usage: ``python -m bench.qlora_dora cpu --steps 10 [--json-out bench/results/qlora_dora_cpu.json]``
       ``python -m bench.qlora_dora memory``   (NF4 vs bf16 bytes of a Llama-3.2-1B-shaped model)
       ``python -m bench.qlora_dora base-loss`` (held-out loss of the untrained base: fp32 vs NF4 vs int4)

CPU run: every setting trains in its own fresh process (peak RSS = that process's ``ru_maxrss``):

* tunelab LoRA / QLoRA / DoRA: ``configs/sft/support-assistant-lora.yaml`` through the real SFT recipe
  (``model.quantize=nf4`` resp. ``lora.use_dora=true`` as the only change), ``train.max_steps`` steps,
  no before-training eval or sample answers; tok/s from ``metrics.jsonl`` (step 1 excluded), held-out
  loss = the recipe's own ``held_out_after.loss`` on the quickstart's validation split.
* peer: HF Trainer + PEFT LoRA and PEFT DoRA (``bench.peer.run_peer``, padding-free mode, fp32), on the
  same training records exported to JSONL, with as many examples per step as give the same real
  tokens per step as tunelab's LoRA run; held-out loss over the same validation records.

Peer and tunelab differ in batching (tunelab packs ≤512-token rows, 2 micro-batches a step, cosine
schedule; the peer pads-free flattens one batch a step, constant LR), so their held-out losses are
reported but only the three tunelab rows are a like-for-like loss comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from bench.metrics import GIB, ru_maxrss_bytes
from bench.subproc import REPO_ROOT, child_env, emit_json_result, save_results

QUICKSTART = REPO_ROOT / "configs" / "sft" / "support-assistant-lora.yaml"
TUNELAB_SETTINGS = {"lora": [], "qlora": ["model.quantize=nf4"], "dora": ["lora.use_dora=true"]}
PEER_SETTINGS = {"peer-lora": False, "peer-dora": True}

# Llama-3.2-1B (config.json of meta-llama/Llama-3.2-1B): linear shapes per decoder layer, 16 layers
LLAMA_1B = {"hidden": 2048, "intermediate": 8192, "heads": 32, "kv_heads": 8, "layers": 16, "vocab": 128256}


def run_tunelab_setting(name: str, steps: int, threads: int) -> dict:
    """Train the quickstart for ``steps`` steps with the overrides of ``name``; return its measurements."""
    from rich.console import Console

    from tunelab.config.load import load_config
    from tunelab.recipes.sft import train

    with tempfile.TemporaryDirectory(prefix="tunelab-bench-qd-") as out:
        overrides = [f"output_dir={out}/run", f"train.max_steps={steps}", f"train.threads={threads}",
                     "eval.before_training=false", "eval.sample_questions=0", f"train.save_every={steps + 1}",
                     f"train.eval_every={steps + 1}", *TUNELAB_SETTINGS[name]]
        config = load_config(str(QUICKSTART), overrides)
        started = time.perf_counter()
        results = train(config, console=Console(stderr=True))
        wall = time.perf_counter() - started
        steps_log = [json.loads(line) for line in (pathlib.Path(out) / "run" / "metrics.jsonl").read_text().split("\n") if line]
    records = [r for r in steps_log if "tokens" in r and "step_s" in r]
    measured = records[1:] or records
    tokens, seconds = sum(r["tokens"] for r in measured), sum(r["step_s"] for r in measured)
    return {"kind": "tunelab", "setting": f"tunelab {name}", "overrides": TUNELAB_SETTINGS[name], "steps": steps,
            "real_tok_s": tokens / seconds, "s_per_step": seconds / len(measured),
            "tokens_per_step": [r["tokens"] for r in records], "losses": [r["loss"] for r in records],
            "held_out_loss": results["held_out_after"]["loss"], "peak_rss_gib": ru_maxrss_bytes() / GIB,
            "train_wall_s": wall}


def export_quickstart_data(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The quickstart's train and validation records as ``{"messages": [...]}`` JSONL (the peer's input)."""
    from tunelab.config.load import load_config
    from tunelab.data.pipeline import load_canonical

    config = load_config(str(QUICKSTART), [])
    paths = []
    for split, source in (("train", config.data.train), ("validation", config.data.validation)):
        examples, _ = load_canonical(source, config.data)
        path = directory / f"quickstart_{split}.jsonl"
        path.write_text("".join(json.dumps({"messages": e["messages"]}) + "\n" for e in examples))
        paths.append(path)
    return paths[0], paths[1]


def peer_examples_per_step(train_path: pathlib.Path, tokens_per_step: float, max_len: int = 512) -> int:
    """Examples per peer step that give ``tokens_per_step`` real tokens on average."""
    from transformers import AutoTokenizer

    from bench.assets import smollm2_dir
    from bench.chat_tokens import encode_file

    examples, _ = encode_file(AutoTokenizer.from_pretrained(smollm2_dir()), train_path, max_len)
    mean_len = sum(len(e["input_ids"]) for e in examples) / len(examples)
    return max(1, round(tokens_per_step / mean_len))


def nf4_memory_count() -> dict:
    """Bytes of the Llama-3.2-1B-shaped decoder linears as bf16 vs NF4 (random init, one layer of each
    shape quantized for real from bf16 and counted 16 times: the byte count depends on the shape only)."""
    import torch

    from tunelab.quant.nf4 import quantize_weight, quantized_bytes

    s = LLAMA_1B
    head_dim = s["hidden"] // s["heads"]
    shapes = {"q_proj": (s["hidden"], s["hidden"]), "k_proj": (s["kv_heads"] * head_dim, s["hidden"]),
              "v_proj": (s["kv_heads"] * head_dim, s["hidden"]), "o_proj": (s["hidden"], s["hidden"]),
              "gate_proj": (s["intermediate"], s["hidden"]), "up_proj": (s["intermediate"], s["hidden"]),
              "down_proj": (s["hidden"], s["intermediate"])}
    torch.manual_seed(0)
    bf16 = nf4 = 0
    for name, shape in shapes.items():
        weight = (torch.randn(shape) * 0.02).to(torch.bfloat16)
        bf16 += weight.numel() * weight.element_size() * s["layers"]
        nf4 += quantized_bytes(quantize_weight(weight, name)) * s["layers"]
    rest = (s["vocab"] * s["hidden"] + (2 * s["layers"] + 1) * s["hidden"]) * 2  # tied embedding + norms, bf16
    return {"shape": s, "linear_bf16_gib": bf16 / GIB, "linear_nf4_gib": nf4 / GIB, "linear_ratio": nf4 / bf16,
            "bits_per_weight": 8 * nf4 / (bf16 / 2), "model_bf16_gib": (bf16 + rest) / GIB,
            "model_with_nf4_linears_gib": (nf4 + rest) / GIB, "model_ratio": (nf4 + rest) / (bf16 + rest)}


def dequant_speed(threads: int, repeats: int = 20) -> dict:
    """Seconds per dequantization of SmolLM2's NF4 weight shapes: tunelab's table gather vs torchao's
    ``get_original_weight`` (the backing for the speed note in ``tunelab.quant.nf4``); checks they are equal."""
    import torch

    from tunelab.quant.nf4 import dequantize_nf4, quantize_weight

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in [(576, 576), (192, 576), (1536, 576), (576, 1536)]:  # q/o, k/v, gate/up, down
        nf4 = quantize_weight(torch.randn(*shape, generator=gen) * 0.02)
        assert torch.equal(dequantize_nf4(nf4), nf4.get_original_weight())
        timed = {}
        for name, fn in (("tunelab", lambda: dequantize_nf4(nf4)), ("torchao", nf4.get_original_weight)):
            fn()
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            timed[name] = (time.perf_counter() - t0) / repeats
        rows.append({"shape": list(shape), "tunelab_s": timed["tunelab"], "torchao_s": timed["torchao"],
                     "speedup": timed["torchao"] / timed["tunelab"]})
    return {"kind": "dequant", "threads": threads, "repeats": repeats, "rows": rows}


def int4_absmax_(model, block_size: int = 64) -> None:
    """Round every decoder linear (not the LM head) to symmetric 4-bit integers with one fp32 absmax per
    ``block_size`` weights, in place: a plain uniform 4-bit format to compare NF4's error against."""
    import torch
    from torch import nn

    head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not head:
                w = module.weight.view(-1, block_size)
                scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 7
                module.weight.copy_(((w / scale).round().clamp(-7, 7) * scale).view_as(module.weight))


def base_loss(threads: int) -> dict:
    """Held-out loss of the quickstart's validation split under the untrained SmolLM2 base: fp32 weights,
    tunelab's NF4 (``model.quantize: nf4``), and a uniform int4 absmax format with the same block size —
    the cost of 4-bit storage before any adapter training (the recipe's own batches and loss)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.assets import smollm2_dir
    from tunelab.config.load import load_config
    from tunelab.data.batching import sft_batch_plan
    from tunelab.data.pipeline import prepare_data
    from tunelab.data.templates import resolve_chat_template
    from tunelab.eval.perplexity import evaluate_lm
    from tunelab.quant.nf4 import quantize_frozen_linears

    torch.set_num_threads(threads)
    config = load_config(str(QUICKSTART), [])
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    resolve_chat_template(tokenizer, config.model.chat_template, config.data.system_prompt)
    data = prepare_data(config.data, tokenizer, config.train.seed)
    batches = sft_batch_plan(data.validation, batch_size=config.eval.batch_size, max_seq_len=config.data.max_seq_len,
                             packing=config.data.packing, shuffle=False, seed=0,
                             pad_token_id=tokenizer.pad_token_id).make_epoch(0)
    rows = {}
    for name, change in (("fp32", None), ("nf4 (tunelab)", quantize_frozen_linears), ("int4 absmax, block 64", int4_absmax_)):
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
        if change is not None:
            change(model)
        rows[name] = evaluate_lm(model, batches, torch.device("cpu"), precision="fp32")["loss"]
    return {"kind": "base_loss", "held_out_loss": rows,
            "vs_fp32": {k: v / rows["fp32"] for k, v in rows.items()}}


def _child(kind: str, kwargs: dict) -> dict:
    """One setting; adds the machine's 1-minute load average before and after (shared-machine contention)."""
    load_before = os.getloadavg()[0]
    if kind == "tunelab":
        result = run_tunelab_setting(**kwargs)
    else:
        from bench.peer import run_peer

        result = run_peer(**kwargs)
    return {**result, "load_avg_1min": [load_before, os.getloadavg()[0]]}


def child_command(kind: str, kwargs: dict) -> list[str]:
    return [sys.executable, "-m", "bench.qlora_dora", "child", kind, json.dumps(kwargs)]


def run_child(kind: str, timeout_s: float | None = None, **kwargs) -> dict:
    """One setting in a fresh interpreter (its own ru_maxrss); an error dict instead of raising."""
    try:
        proc = subprocess.run(child_command(kind, kwargs), cwd=REPO_ROOT, env=child_env(kwargs.get("threads")),
                              stdout=subprocess.PIPE, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"kind": kind, "error": f"timed out after {timeout_s} s"}
    return _parse_child(kind, proc.returncode, proc.stdout)


def _parse_child(kind: str, returncode: int, stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if returncode or not lines:
        return {"kind": kind, "error": f"exit code {returncode}"}
    return json.loads(lines[-1])


def run_children_concurrently(jobs: list[tuple[str, dict]], timeout_s: float | None) -> list[dict]:
    """All settings at once, each in its own process (own ru_maxrss); for a machine too loaded to run them
    one after another in time. They then compete for the same cores: compare their tok/s only with each other."""
    procs = [(kind, subprocess.Popen(child_command(kind, kw), cwd=REPO_ROOT, env=child_env(kw.get("threads")),
                                     stdout=subprocess.PIPE, text=True)) for kind, kw in jobs]
    deadline = time.monotonic() + (timeout_s or 1e9)
    results = []
    for kind, proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(_parse_child(kind, proc.returncode, out))
        except subprocess.TimeoutExpired:
            proc.kill()
            results.append({"kind": kind, "error": f"timed out after {timeout_s} s"})
    return results


def table(results: list[dict]) -> str:
    """Markdown rows: tok/s, s/step, peak RSS, held-out loss, each vs tunelab LoRA and vs the matching peer."""
    by = {r.get("setting"): r for r in results}
    base = by.get("tunelab lora")
    rows = ["| setting | real tok/s | s/step | peak RSS GiB | held-out loss | loss vs tunelab LoRA | speed vs tunelab LoRA |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r.get('setting', r['kind'])} | ERROR: {r['error']} | | | | | |")
            continue
        loss_ratio = r["held_out_loss"] / base["held_out_loss"] if base and r.get("held_out_loss") else None
        speed = r["real_tok_s"] / base["real_tok_s"] if base else None
        rows.append(f"| {r['setting']} | {r['real_tok_s']:.1f} | {r['s_per_step']:.2f} | {r['peak_rss_gib']:.2f} "
                    f"| {_fmt(r.get('held_out_loss'), '.4f')} | {_fmt(loss_ratio, '.4f')} | {_fmt(speed, '.2f')}x |")
    return "\n".join(rows)


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


ORDER = ("lora", "dora", "peer-dora", "qlora", "peer-lora")  # tunelab LoRA first: the peer's batch size follows it


def run_cpu(args) -> list[dict]:
    """The settings named in ``args.settings`` in :data:`ORDER`, each in a fresh process; results are also
    written to ``args.json_out`` after every setting, so a cut-short run keeps what it measured."""
    from bench.assets import smollm2_dir

    wanted = [s for s in ORDER if s in args.settings.split(",")]
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-qd-data-") as tmp:
        train_path, val_path = export_quickstart_data(pathlib.Path(tmp))
        if args.concurrent:
            examples = peer_examples_per_step(train_path, args.peer_tokens_per_step)
            jobs = [("tunelab", {"name": n, "steps": args.steps, "threads": args.threads}) if n in TUNELAB_SETTINGS
                    else ("peer", {"model_dir": str(smollm2_dir()), "data_path": str(train_path), "mode": "padding_free",
                                   "steps": args.steps, "examples_per_step": examples, "lr": 3e-4,
                                   "threads": args.threads, "use_dora": PEER_SETTINGS[n],
                                   "eval_data_path": str(val_path)}) for n in wanted]
            results = run_children_concurrently(jobs, args.timeout_s)
            if args.json_out:
                pathlib.Path(args.json_out).write_text(json.dumps(results, indent=1))
            return results
        examples = None
        for name in wanted:
            print(f"[qlora_dora] {name} ...", file=sys.stderr, flush=True)
            if name in TUNELAB_SETTINGS:
                results.append(run_child("tunelab", args.timeout_s, name=name, steps=args.steps, threads=args.threads))
            else:
                if examples is None:
                    lora = next((r for r in results if r.get("setting") == "tunelab lora" and "error" not in r), None)
                    per_step = sum(lora["tokens_per_step"]) / len(lora["tokens_per_step"]) if lora else 1000
                    examples = peer_examples_per_step(train_path, per_step)
                results.append(run_child("peer", args.timeout_s, model_dir=str(smollm2_dir()), data_path=str(train_path),
                                         mode="padding_free", steps=args.steps, examples_per_step=examples, lr=3e-4,
                                         threads=args.threads, use_dora=PEER_SETTINGS[name],
                                         eval_data_path=str(val_path)))
            if args.json_out:
                pathlib.Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
                pathlib.Path(args.json_out).write_text(json.dumps(results, indent=1))
    return results


def main(argv=None) -> int:
    """CLI (see module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "child":
        emit_json_result(_child, argv[1], json.loads(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description="LoRA vs QLoRA vs DoRA (tunelab) vs PEFT LoRA/DoRA")
    ap.add_argument("target", choices=["cpu", "memory", "dequant", "base-loss"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=None)
    ap.add_argument("--settings", default=",".join(ORDER), help=f"comma-separated subset of {ORDER}")
    ap.add_argument("--concurrent", action="store_true", help="run the settings at the same time (loaded machines)")
    ap.add_argument("--peer-tokens-per-step", type=float, default=1000.0,
                    help="with --concurrent: real tokens per peer step (tunelab's quickstart step is ≈ 2 rows ≤ 512)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    cmd = " ".join(["python -m bench.qlora_dora", *argv])
    single = {"memory": nf4_memory_count, "dequant": lambda: dequant_speed(args.threads),
              "base-loss": lambda: base_loss(args.threads)}
    if args.target in single:
        results = [single[args.target]()]
        print(json.dumps(results[0], indent=1))
    else:
        results = run_cpu(args)
        print(f"- command: `{cmd}`\n- CPU: {os.cpu_count()} logical cores (shared with other jobs), "
              f"threads {args.threads}\n\n{table(results)}")
    return save_results(args.json_out, results)


if __name__ == "__main__":
    sys.exit(main())
