"""tunelab vs peer (HF Trainer + PEFT LoRA) training-speed comparison, one invocation.

Usage: ``python -m bench.compare cpu --steps 4 [--skip-tunelab]``

Builds ``bench/out/sharegpt512.jsonl`` if missing, runs the peer in ``padding`` and
``padding_free`` modes and (unless skipped / not present) ``bench.tunelab_side.run_tunelab``,
each in its own subprocess, then prints a markdown table. Ratios are against the best CORRECT
peer (highest real tok/s among peer runs whose pre-flight logits check passed).

tunelab side contract (``bench/tunelab_side.py``, written separately; run via
``bench.subproc.run_in_subprocess("tunelab", ...)`` in a fresh process, kwargs passed as JSON)::

    def run_tunelab(model_dir: str, data_path: str, *, steps: int, tokens_per_step: int,
                    examples_per_step: int = 8, lora_r: int = 16, lora_alpha: int = 32,
                    lr: float = 2e-4, seed: int = 0, threads: int = 2, max_len: int = 512) -> dict

``tokens_per_step`` = mean real (non-pad) tokens per step of the reference peer run, for
token-budget batching; ``examples_per_step`` is the peer's batch size. Same LoRA (all linear
layers except lm_head, dropout 0), fp32, constant LR, AdamW, grad-clip 1.0, assistant-only labels
incl. ``<|im_end|>`` (see bench.chat_tokens). Must return at least the keys in
``TUNELAB_REQUIRED_KEYS`` (s, tokens/s, GiB; rates computed with ``bench.metrics.summarize_steps``,
step 1 excluded) and should add ``correct`` (bool), ``losses``, ``step_times_s``,
``real_tokens_per_step``, ``other_procs_cpu_cores_per_step`` (``bench.metrics.cpu_snapshot``).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import pathlib
import shlex
import sys

from bench.subproc import REPO_ROOT, run_in_subprocess, save_results, side_available

PEER_MODES = ("padding", "padding_free")
CONTENTION_CORES = 0.25  # other processes' mean CPU use (cores) above which a run is flagged
TUNELAB_REQUIRED_KEYS = ("setting", "real_tok_s", "supervised_tok_s", "s_per_step", "peak_rss_gib", "final_loss")


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (or platform fallback)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def header(args) -> str:
    """Environment block: versions, CPU, threads, date (UTC), command."""
    def ver(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    cmd = " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), "-m", "bench.compare", *sys.argv[1:]])
    return "\n".join([
        f"- command: `{cmd}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- torch {ver('torch')}, transformers {ver('transformers')}, peft {ver('peft')}",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical cores), torch threads: {args.threads}",
        f"- model: SmolLM2-135M-Instruct fp32, LoRA r={args.lora_r} alpha={args.lora_alpha} all-linear, "
        f"lr={args.lr}, {args.examples_per_step} examples/step, {args.steps} steps (step 1 excluded from rates)",
    ])


def ensure_data(path: pathlib.Path, model_dir, num: int, max_len: int) -> None:
    """Build the ShareGPT JSONL if it does not exist yet."""
    if path.exists():
        return
    from transformers import AutoTokenizer

    from bench.sharegpt_data import build_sharegpt_bench

    build_sharegpt_bench(path, AutoTokenizer.from_pretrained(model_dir), num=num, max_tokens=max_len)


def _fmt(value, spec: str) -> str:
    """Format a number or return 'n/a'."""
    return format(value, spec) if isinstance(value, (int, float)) else "n/a"


def other_cores(r: dict) -> float | None:
    """Mean CPU cores used by OTHER processes during the measured steps (None if not recorded)."""
    other = r.get("other_procs_cpu_cores_per_step") or []
    measured = other[r.get("warmup_steps_excluded", 1):]
    return sum(measured) / len(measured) if measured else None


def best_peer(results: list[dict]) -> dict | None:
    """Fastest (real tok/s) peer run that passed its correctness check."""
    ok = [r for r in results if r.get("kind") == "peer" and "error" not in r and r.get("correct")]
    return max(ok, key=lambda r: r["real_tok_s"]) if ok else None


def table(results: list[dict]) -> str:
    """Markdown table of all runs with speed/RSS ratios vs the best correct peer."""
    best = best_peer(results)
    rows = ["| setting | correct | real tok/s | supervised tok/s | s/step | peak RSS GiB | final loss "
            "| speed vs best peer | RSS vs best peer | other procs' CPU (cores) |", "|" + "---|" * 10]
    for r in results:
        if "error" in r:
            rows.append(f"| {r.get('setting', r['kind'])} | ERROR: {r['error']} |" + " |" * 8)
            continue
        speed = r["real_tok_s"] / best["real_tok_s"] if best else None
        rss = r["peak_rss_gib"] / best["peak_rss_gib"] if best else None
        correct = {True: "yes", False: "NO"}.get(r.get("correct"), "?")
        rows.append(f"| {r['setting']}{' (best peer)' if r is best else ''} | {correct} | {_fmt(r['real_tok_s'], '.1f')} "
                    f"| {_fmt(r['supervised_tok_s'], '.1f')} | {_fmt(r['s_per_step'], '.2f')} "
                    f"| {_fmt(r['peak_rss_gib'], '.2f')} | {_fmt(r['final_loss'], '.4f')} "
                    f"| {_fmt(speed, '.2f')}x | {_fmt(rss, '.2f')}x | {_fmt(other_cores(r), '.2f')} |")
    return "\n".join(rows)


def notes(results: list[dict]) -> str:
    """Consistency notes: same batches across runs, per-step losses, correctness checks."""
    out = []
    fps = {r.get("setting"): r.get("batch_fingerprint") for r in results if "error" not in r}
    peer_fps = {v for k, v in fps.items() if k and k.startswith("peer")}
    out.append(f"- peer batch order identical across modes: {len(peer_fps) == 1} (fingerprints {fps})")
    for r in results:
        if "error" in r:
            continue
        losses = ", ".join(_fmt(x, ".4f") for x in r.get("losses", []))
        extra = ""
        if "check_max_abs_logit_diff" in r:
            extra = f"; batched-vs-single logits max|diff| {r['check_max_abs_logit_diff']:.2e}"
        if "check_with_use_cache_true_max_abs_logit_diff" in r:
            extra += f" (with use_cache=True it would be {r['check_with_use_cache_true_max_abs_logit_diff']:.2e})"
        times = ", ".join(_fmt(x, ".2f") for x in r.get("step_times_s", []))
        busy = other_cores(r)
        if busy is not None:
            extra += f"; other processes used {busy:.2f} CPU cores on average during measured steps"
            extra += " -- WARNING: contended, timings unreliable" if busy > CONTENTION_CORES else ""
        out.append(f"- {r['setting']}: step times s [{times}]; losses [{losses}]; "
                   f"real tokens/step {r.get('real_tokens_per_step')}{extra}")
    return "\n".join(out)


def wait_for_idle(max_wait_s: float, threshold_cores: float = CONTENTION_CORES, window_s: float = 5.0) -> float:
    """Block until the machine's busy CPU over ``window_s`` seconds is below ``threshold_cores`` cores,
    or ``max_wait_s`` seconds pass. Returns the last measured busy cores. (Shared-box hygiene.)"""
    import time

    import psutil

    deadline = time.monotonic() + max_wait_s
    while True:
        busy = psutil.cpu_percent(interval=window_s) / 100 * (psutil.cpu_count() or 1)
        if busy < threshold_cores or time.monotonic() >= deadline:
            print(f"[compare] machine busy: {busy:.2f} cores before run", file=sys.stderr, flush=True)
            return busy
        time.sleep(5)


def common_kwargs(args, model_dir, data_path) -> dict:
    """Kwargs shared by every side: same model, data, LoRA, optimiser settings, steps, threads."""
    return {"model_dir": str(model_dir), "data_path": str(data_path), "steps": args.steps,
            "examples_per_step": args.examples_per_step, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
            "lr": args.lr, "seed": args.seed, "threads": args.threads, "max_len": args.max_len}


def run_tunelab_side(args, model_dir, data_path, peers: list[dict], precision: str = "fp32") -> dict:
    """Run ``bench.tunelab_side.run_tunelab`` in a subprocess; tokens_per_step = mean real tokens/step of the
    reference peer (best correct peer, else first successful one), so both process the same token volume."""
    ref = best_peer(peers) or next((p for p in peers if "error" not in p), None)
    if ref is None:
        return {"kind": "tunelab", "setting": "tunelab", "error": "no successful peer run to size tokens_per_step"}
    tokens_per_step = round(sum(ref["real_tokens_per_step"]) / len(ref["real_tokens_per_step"]))
    result = run_in_subprocess("tunelab", timeout_s=args.timeout_s, tokens_per_step=tokens_per_step,
                               batch_example_ids=ref.get("batch_example_ids"), precision=precision,
                               **common_kwargs(args, model_dir, data_path))
    result.setdefault("kind", "tunelab")
    result.setdefault("setting", "tunelab")
    missing = [k for k in TUNELAB_REQUIRED_KEYS if k not in result]
    if "error" not in result and missing:
        result["error"] = f"result dict lacks keys {missing}"
    return result


def parse_args(argv=None):
    """CLI arguments (see module docstring)."""
    ap = argparse.ArgumentParser(description="tunelab vs HF Trainer+PEFT training-speed benchmark")
    ap.add_argument("target", choices=["cpu"], help="only 'cpu' for now (fp32, no GPU)")
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps per run (step 1 = warm-up)")
    ap.add_argument("--skip-tunelab", action="store_true")
    ap.add_argument("--tunelab-precisions", default="fp32",
                    help="tunelab runs, comma-separated: fp32 (the CPU default) and/or bf16 (bf16 frozen base + autocast)")
    ap.add_argument("--data", default=str(REPO_ROOT / "bench" / "out" / "sharegpt512.jsonl"))
    ap.add_argument("--num", type=int, default=512, help="conversations in the data file")
    ap.add_argument("--max-len", type=int, default=512, help="max chat-template tokens per conversation")
    ap.add_argument("--examples-per-step", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default=",".join(PEER_MODES), help="peer modes to run, comma-separated")
    ap.add_argument("--timeout-s", type=float, default=None, help="per-subprocess timeout (s)")
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="before each run wait up to this many seconds for other CPU load to drop below "
                         f"{CONTENTION_CORES} cores (shared machines)")
    ap.add_argument("--json-out", default=None, help="optional path for all raw result dicts")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    """Run everything and print the report; exit code 1 if any run failed."""
    args = parse_args(argv)
    from bench.assets import smollm2_dir

    model_dir, data_path = smollm2_dir(), pathlib.Path(args.data)
    ensure_data(data_path, model_dir, args.num, args.max_len)
    head = header(args)
    print(head, file=sys.stderr, flush=True)
    results = []
    for mode in args.modes.split(","):
        print(f"\n[compare] peer {mode} ...", file=sys.stderr, flush=True)
        wait_for_idle(args.wait_idle)
        r = run_in_subprocess("peer", timeout_s=args.timeout_s, mode=mode, **common_kwargs(args, model_dir, data_path))
        r.setdefault("setting", f"peer ({mode})")
        results.append(r)
    if args.skip_tunelab:
        print("[compare] tunelab side skipped (--skip-tunelab)", file=sys.stderr)
    elif not side_available("tunelab"):
        print("[compare] bench/tunelab_side.py not found: peer rows only", file=sys.stderr)
    else:
        peers = list(results)
        for precision in args.tunelab_precisions.split(","):
            print(f"\n[compare] tunelab {precision} ...", file=sys.stderr, flush=True)
            wait_for_idle(args.wait_idle)
            results.append(run_tunelab_side(args, model_dir, data_path, peers, precision))
    print("\n" + head + "\n\n" + table(results) + "\n\n" + notes(results))
    return save_results(args.json_out, results)


if __name__ == "__main__":
    sys.exit(main())
