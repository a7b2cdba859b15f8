"""Held-out pairwise accuracy of a reward model next to the reply-length heuristic, on the same pairs.

    python -m bench.preference_heldout --data builtin:qa-feedback --name one-per-question --split validation \\
        --run runs/rm-qa-feedback --group question_id
    python -m bench.preference_heldout --data builtin:summeval-pairs --name disjoint --split validation \\
        --run runs/rm-summeval --group doc_id

For each pair: the length heuristic prefers the reply with more whitespace-separated words (a tie
counts 1/2); the reward model prefers the higher score (``tunelab score``'s per-pair output). Both
get a Wilson 95% interval (pairs treated as independent) and, with ``--group FIELD``, a
cluster-bootstrap 95% interval that resamples the groups (questions, articles) whose pairs share
text. ``paired`` counts pairs where exactly one of the two is right (a sign test on those: the
two-sided exact binomial p-value). Prints one JSON object; ``--out`` writes it too.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
from pathlib import Path
from typing import Any

from tunelab.eval.intervals import wilson_interval


def length_choice(chosen: str, rejected: str) -> float:
    """1 when the longer reply (in words) is the chosen one, 0 when it is the rejected one, 1/2 on a tie."""
    a, b = len(chosen.split()), len(rejected.split())
    return 1.0 if a > b else 0.0 if a < b else 0.5


def cluster_bootstrap(correct: list[float], groups: list[Any], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """2.5 / 97.5 percentiles of the accuracy when whole groups are resampled with replacement."""
    by_group: dict[Any, list[float]] = {}
    for value, group in zip(correct, groups):
        by_group.setdefault(group, []).append(value)
    keys = list(by_group)
    rng = random.Random(seed)
    stats = []
    for _ in range(draws):
        picked = [by_group[keys[rng.randrange(len(keys))]] for _ in keys]
        stats.append(sum(map(sum, picked)) / sum(map(len, picked)))
    stats.sort()
    return stats[int(0.025 * draws)], stats[int(0.975 * draws) - 1]


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of ``wins`` vs ``losses`` under p = 1/2."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def summarize(correct: list[float], groups: list[Any] | None) -> dict[str, Any]:
    """Accuracy, Wilson interval and (with groups) the cluster-bootstrap interval."""
    out = {"accuracy": round(sum(correct) / len(correct), 4), "pairs": len(correct),
           "wilson95": [round(v, 4) for v in wilson_interval(sum(correct), len(correct))]}
    if groups is not None:
        out["groups"] = len(set(groups))
        out["cluster_bootstrap95"] = [round(v, 4) for v in cluster_bootstrap(correct, groups)]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from rich.console import Console

    from tunelab.config.schema import DataSource
    from tunelab.data.sources import load_records

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--name", default=None)
    parser.add_argument("--split", default="validation")
    parser.add_argument("--run", default=None, help="a finished reward-model run to score the same pairs")
    parser.add_argument("--group", default=None, help="record field whose pairs share text (cluster bootstrap)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    records = load_records(DataSource(path=args.data, name=args.name, split=args.split))
    groups = [r[args.group] for r in records] if args.group else None
    length = [length_choice(r["chosen"], r["rejected"]) for r in records]
    result: dict[str, Any] = {"data": args.data, "name": args.name, "split": args.split,
                              "length_heuristic": summarize(length, groups)}
    if args.run:
        from tunelab.cli.preference_cmds import score_pairs

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "scores.jsonl"
            score_pairs(Path(args.run), args.data, args.name, args.split, 16, None, out, 0, Console(quiet=True))
            scores = [json.loads(line) for line in out.read_text().split("\n") if line]
        if len(scores) != len(records):
            raise SystemExit(f"{args.run}: scored {len(scores)} of {len(records)} pairs (some were dropped)")
        model = [1.0 if s["chosen_score"] > s["rejected_score"] else 0.0 for s in scores]
        result["reward_model"] = {"run": args.run, **summarize(model, groups)}
        only_model = sum(1 for m, n in zip(model, length) if m == 1.0 and n == 0.0)
        only_length = sum(1 for m, n in zip(model, length) if m == 0.0 and n == 1.0)
        result["paired"] = {"only_reward_model_right": only_model, "only_length_right": only_length,
                            "sign_test_p": round(sign_test(only_model, only_length), 4)}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
