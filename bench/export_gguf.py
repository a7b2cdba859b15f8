"""GGUF export of the quickstart model, measured in llama.cpp: file size, tokens/s, held-out loss.

    python -m bench.export_gguf [RUN_OR_MODEL] [--quants f16,q8_0,q4_k_m] [--threads 2]

RUN_OR_MODEL defaults to the quickstart's base model (``smollm2-135m-instruct``); give
``runs/support-assistant`` after ``make demo`` to measure the fine-tuned run (LoRA merged). The
held-out set is the quickstart config's validation split, tokenized by tunelab's pipeline; the loss
is the mean next-token NLL over supervised tokens computed from llama.cpp's own logits, beside the
same loss from transformers (fp32, the model before export). Speed: prompt eval and greedy
generation of 64 tokens, tokens/s, on the CPU threads given. Needs the llama extra.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sft" / "support-assistant-lora.yaml"


def held_out(tokenizer, limit: int):
    from tunelab.config.load import load_config
    from tunelab.data.pipeline import prepare_data

    cfg = load_config(CONFIG, [])
    return prepare_data(cfg.data, tokenizer, cfg.train.seed).validation[:limit]


def nll_from_logits(logits: np.ndarray, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Summed NLL (nats) of supervised tokens; ``logits`` ``(T, V)`` predicts token t+1 at row t."""
    total, count = 0.0, 0
    for t in range(1, len(ids)):
        if labels[t] == -100:
            continue
        row = logits[t - 1].astype(np.float64)
        total += float(np.logaddexp.reduce(row) - row[ids[t]])
        count += 1
    return total, count


def hf_loss(model, examples) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = model(torch.tensor([ex.input_ids])).logits[0].numpy()
            s, c = nll_from_logits(logits, ex.input_ids, ex.labels)
            total, count = total + s, count + c
    return total / count


def llama_measure(path: Path, examples, prompt_ids: list[int], threads: int) -> dict[str, float]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_batch=512, logits_all=True,
                          verbose=False)
    total, count = 0.0, 0
    for ex in examples:
        llm.reset()
        llm.eval(ex.input_ids)
        s, c = nll_from_logits(np.asarray(llm.scores[: len(ex.input_ids)]), ex.input_ids, ex.labels)
        total, count = total + s, count + c
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt_ids)
    prompt_s = time.perf_counter() - start
    start, generated = time.perf_counter(), 0
    for _ in range(64):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
        generated += 1
    gen_s = time.perf_counter() - start
    return {"size_mib": path.stat().st_size / 2**20, "prompt_tok_s": len(prompt_ids) / prompt_s,
            "gen_tok_s": generated / gen_s, "held_out_loss": total / count, "tokens": count}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--quants", default="f16,q8_0,q4_k_m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--examples", type=int, default=40)
    args = parser.parse_args()

    from tunelab.export.gguf_file import write_gguf
    from tunelab.export.source import load_export_source

    torch.set_num_threads(args.threads)
    source = load_export_source(args.model)
    examples = held_out(source.tokenizer, args.examples)
    prompt = source.tokenizer.apply_chat_template([{"role": "user", "content": "My printer is not printing. "
                                                    "What should I check first?"}], tokenize=False,
                                                  add_generation_prompt=True)
    prompt_ids = source.tokenizer(prompt)["input_ids"]
    results = {"model": args.model, "examples": len(examples), "hf_fp32_loss": hf_loss(source.model, examples)}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quants.split(","):
            path = Path(tmp) / f"{quant}.gguf"
            start = time.perf_counter()
            write_gguf(source.model, source.tokenizer, path, quant, name=source.name)
            results[quant] = {"export_s": time.perf_counter() - start,
                              **llama_measure(path, examples, prompt_ids, args.threads)}
            print(quant, json.dumps(results[quant]), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
