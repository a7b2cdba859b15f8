"""Governing-law extraction on held-out CUAD contracts: exact match of SmolLM2 before vs after SFT.

    python -m bench.legal_governing_law runs/cuad-governing-law [--split test]

Greedy replies (``tunelab.models.generate.generate_replies``, up to 24 new tokens) of the starting
model (the run's base, no adapter) and of the fine-tuned run to the user turn of every
``builtin:cuad-governing-law`` record of the split (contracts never seen in training). A reply counts
when ``normalize_jurisdiction(reply) == normalize_jurisdiction(CUAD answer)`` (lower case, "the laws
of"/"State of" removed, trailing country after a comma removed, ``;``/``and`` lists order-free; see
:func:`tunelab.data.builtin_cuad.normalize_jurisdiction`); a looser "contains" count (the normalised
answer appears inside the normalised reply) is reported beside it. 95 % Wilson intervals; the paired
difference is tested by an exact McNemar test on the discordant contracts.

Writes ``bench/results/legal-governing-law.md`` and ``.json`` (every reply, before and after).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from tunelab.eval.intervals import wilson_interval

RESULTS = Path(__file__).parent / "results" / "legal-governing-law.md"


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b vs c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def score(replies: list[str], answers: list[str]) -> dict[str, Any]:
    from tunelab.data.builtin_cuad import normalize_jurisdiction as norm

    exact = [norm(r) == norm(a) for r, a in zip(replies, answers)]
    contains = [bool(norm(a)) and norm(a) in norm(r) for r, a in zip(replies, answers)]
    k, n = sum(exact), len(exact)
    return {"exact_match": k / n, "exact_match_ci95": wilson_interval(k, n), "correct": k, "n": n,
            "contains": sum(contains) / n, "per_example": exact}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch

    from tunelab.data.builtin import load_builtin
    from tunelab.models.generate import generate_replies
    from tunelab.models.loading import load_model
    from tunelab.models.run import load_run

    torch.set_num_threads(2)
    started, load_before = time.perf_counter(), os.getloadavg()
    records = load_builtin("cuad-governing-law", None, args.split)
    prompts = [r["messages"][:1] for r in records]
    answers = [r["answer"] for r in records]
    model, tokenizer, info = load_run(args.run_dir)

    def replies(m) -> list[str]:
        out = []
        for i in range(0, len(prompts), args.batch_size):
            out += generate_replies(m, tokenizer, prompts[i:i + args.batch_size], max_new_tokens=24)
        return out

    after = replies(model)
    base = load_model(info["base_model"])
    base.eval()
    before = replies(base)
    res_before, res_after = score(before, answers), score(after, answers)
    b = sum(a and not z for a, z in zip(res_before["per_example"], res_after["per_example"]))
    c = sum(z and not a for a, z in zip(res_before["per_example"], res_after["per_example"]))
    seconds = round(time.perf_counter() - started, 1)
    summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               "command": f"python -m bench.legal_governing_law {args.run_dir} --split {args.split}",
               "run": str(args.run_dir), "split": args.split, "n": len(records), "wall_seconds": seconds,
               "load_average_start": load_before, "load_average_end": os.getloadavg(),
               "before": {k: v for k, v in res_before.items() if k != "per_example"},
               "after": {k: v for k, v in res_after.items() if k != "per_example"},
               "mcnemar": {"only_before_right": b, "only_after_right": c, "p_exact": mcnemar_exact(b, c)},
               "train": (info.get("results") or {}).get("train_seconds")}
    examples = [{"contract": r["contract"], "answer": a, "before": x, "after": y}
                for r, a, x, y in zip(records, answers, before, after)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({**summary, "examples": examples}, indent=2))
    args.out.write_text(markdown(summary, examples))
    print(json.dumps(summary, indent=2))


def markdown(s: dict[str, Any], examples: list[dict[str, Any]]) -> str:
    def row(name: str, r: dict[str, Any]) -> str:
        lo, hi = r["exact_match_ci95"]
        return f"| {name} | {r['correct']}/{r['n']} = {r['exact_match']:.3f} | [{lo:.3f}, {hi:.3f}] | {r['contains']:.3f} |"

    lines = ["# CUAD governing-law extraction: exact match before/after SFT", "",
             f"Command: `{s['command']}`; date {s['date']}; wall {s['wall_seconds']} s for both generations; "
             f"shared 2-core machine, load average {s['load_average_start'][0]:.1f} at start, "
             f"{s['load_average_end'][0]:.1f} at end.", "",
             f"Held-out contracts: `builtin:cuad-governing-law` split `{s['split']}` ({s['n']} contracts, none in "
             "training). Greedy, ≤ 24 new tokens. Exact match after `normalize_jurisdiction` on both sides.", "",
             "| model | exact match | 95 % Wilson CI | contains answer |", "|---|---|---|---|",
             row("SmolLM2-135M-Instruct (before)", s["before"]), row(f"after SFT (`{s['run']}`)", s["after"]),
             "", f"McNemar (paired): only before right {s['mcnemar']['only_before_right']}, only after right "
             f"{s['mcnemar']['only_after_right']}, exact p = {s['mcnemar']['p_exact']:.2g}.", "",
             "First 12 held-out contracts:", "", "| answer (CUAD) | before | after |", "|---|---|---|"]
    for e in examples[:12]:
        lines.append(f"| {e['answer']} | {e['before'][:80]!r} | {e['after'][:80]!r} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
