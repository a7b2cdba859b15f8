"""Held-out reward, sample-completion logging and reward curves for the RL recipes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from tunelab.config.rl import RLConfig
from tunelab.config.schema import Config
from tunelab.rollout.batch import rollout
from tunelab.rollout.prompts import Prompt
from tunelab.rollout.rewards import RewardInputs, RewardTerm, compute_rewards
from tunelab.rollout.session import RLSession


def evaluate_rewards(
    model: nn.Module, tokenizer: Any, prompts: list[Prompt], terms: list[RewardTerm], rl: RLConfig, *,
    stop_ids: list[int], device: torch.device, batch_size: int = 16, num_samples: int = 3,
) -> dict[str, Any]:
    """Greedy completions for held-out ``prompts``, scored by every reward term.

    Returns ``reward`` (mean total), ``reward/<term>`` (mean raw score of each term),
    ``length`` (mean completion tokens), ``truncated`` (fraction without a stop token),
    ``num_prompts``, ``per_prompt`` (each prompt's total reward, in prompt order, so two
    evaluations of the same prompts can be compared pair by pair) and ``samples`` (the first
    ``num_samples`` prompt/completion/reward triples).
    """
    totals, per_term, lengths, truncated, samples = [], {}, [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        batch, inputs = rollout(model, tokenizer, chunk, rl, num_generations=1, stop_ids=stop_ids, device=device,
                                greedy=True)
        total, terms_out = compute_rewards(terms, inputs)
        totals += total.tolist()
        for name, values in terms_out.items():
            per_term.setdefault(name, []).extend(values.tolist())
        lengths += inputs.num_tokens
        truncated += batch.truncated.tolist()
        samples += sample_records(inputs, total, terms_out, limit=num_samples - len(samples))
    result = {"reward": _mean(totals), **{f"reward/{k}": _mean(v) for k, v in per_term.items()},
              "length": _mean(lengths), "truncated": _mean([float(t) for t in truncated]),
              "num_prompts": len(prompts), "per_prompt": [round(t, 4) for t in totals], "samples": samples}
    return result


def sample_records(inputs: RewardInputs, total: torch.Tensor, per_term: dict[str, torch.Tensor],
                   limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` JSON-ready ``{prompt, completion, reward, rewards}`` records, spread evenly over the batch
    (so GRPO samples come from different prompt groups)."""
    out, size = [], len(inputs.completions)
    for row in list(range(0, size, max(1, size // max(limit, 1))))[:max(limit, 0)]:
        out.append({"prompt": inputs.prompts[row], "completion": inputs.completions[row],
                    "reward": round(float(total[row]), 4),
                    "rewards": {k: round(float(v[row]), 4) for k, v in per_term.items()}})
    return out


def log_samples(path: Path, step: int, records: list[dict[str, Any]]) -> None:
    """Append one JSON line per sample completion (with its step) to ``path`` (``samples.jsonl``)."""
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps({"step": step, **record}, ensure_ascii=False) + "\n")


def plot_reward_curve(records: list[dict[str, Any]], path: Path, title: str,
                      held_out: tuple[float, float] | None = None, steps: int = 0) -> None:
    """Mean training reward per RL step (and KL when logged) as a PNG; held-out before/after as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["step"], r["reward/mean"]) for r in records if "reward/mean" in r]
    kl = [(r["step"], r["kl"]) for r in records if "kl" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if points:
        ax.plot(*zip(*points), label="train reward (mean over rollout)", linewidth=1, alpha=0.5)
        window = 5
        if len(points) >= window:
            smooth = [sum(v for _, v in points[i - window + 1:i + 1]) / window for i in range(window - 1, len(points))]
            ax.plot([s for s, _ in points[window - 1:]], smooth, label=f"moving average ({window} steps)", linewidth=2)
    if held_out is not None:
        ax.plot([0, steps], list(held_out), "o--", label="held-out reward (greedy), before → after")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if kl:
        ax2 = ax.twinx()
        ax2.plot(*zip(*kl), color="tab:red", alpha=0.5, linewidth=1, label="KL to reference (nats/seq)")
        ax2.set_ylabel("KL (nats per sequence)")
        ax2.legend(loc="lower right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def held_out_rewards(session: RLSession, config: Config) -> dict[str, Any]:
    """:func:`evaluate_rewards` on the session's held-out prompts with the run's settings."""
    return evaluate_rewards(session.model, session.tokenizer, session.held_out, session.terms, config.rl,
                            stop_ids=session.stop_ids, device=session.device, batch_size=config.eval.batch_size,
                            num_samples=config.eval.sample_questions)


def paired_comparison(before: list[float], after: list[float]) -> dict[str, Any]:
    """Per-prompt comparison of two evaluations of the same held-out prompts.

    Returns ``mean_diff`` (after - before, reward units), ``wins``/``losses``/``ties`` (prompts
    whose reward rose / fell / stayed) and ``wilcoxon_p``: the two-sided p-value of the Wilcoxon
    signed-rank test (Wilcoxon 1945; ``scipy.stats.wilcoxon``, zero differences dropped), ``None``
    when every difference is zero.

    Raises:
        ValueError: the two lists differ in length (not the same prompts).
    """
    from scipy.stats import wilcoxon

    if len(before) != len(after):
        raise ValueError(f"paired comparison needs the same prompts: {len(before)} before vs {len(after)} after")
    diffs = [a - b for a, b in zip(after, before)]
    nonzero = [d for d in diffs if d != 0]
    p_value = float(wilcoxon(nonzero).pvalue) if nonzero else None
    return {"mean_diff": _mean(diffs), "wins": sum(d > 0 for d in diffs), "losses": sum(d < 0 for d in diffs),
            "ties": len(diffs) - len(nonzero), "wilcoxon_p": None if p_value is None else round(p_value, 4)}


def rl_results(session: RLSession, before, after, steps: int, started: float) -> dict[str, Any]:
    """The results block stored in ``tunelab.json`` (prompt counts incl. drops, before/after rewards and,
    when both exist, their per-prompt :func:`paired_comparison` as ``held_out_paired``)."""
    return {"train_prompts": len(session.train.prompts), "train_prompts_too_long": session.train.num_too_long,
            "held_out_prompts": len(session.held_out), "held_out_too_long": session.num_held_out_too_long,
            "held_out_in_train": session.num_held_out_in_train,
            "held_out_before": before, "held_out_after": after,
            "held_out_paired": paired_comparison(before["per_prompt"], after["per_prompt"]) if before and after else None,
            "steps": steps,
            "train_seconds": round(time.perf_counter() - started, 1)}


def report_rl(console: Console, results: dict[str, Any], output_dir: Path) -> None:
    """Print the before/after held-out reward table and a few held-out completions."""
    before, after = results["held_out_before"], results["held_out_after"]
    if after:
        table = Table(title=f"held-out reward, greedy ({after['num_prompts']} prompts)")
        keys = [k for k in after if k.startswith("reward") or k in ("length", "truncated")]
        for col in ("", *keys):
            table.add_column(col)
        for name, row in (("before", before), ("after", after)):
            if row:
                table.add_row(name, *(f"{row[k]:.4f}" for k in keys))
        console.print(table)
        for sample in after["samples"]:
            console.print(f"[dim]{sample['prompt'][:80]}[/] → {sample['completion'][:120]!r} ({sample['reward']:+.2f})")
    console.print(f"[bold green]saved[/] {output_dir} ({results['steps']} RL steps, {results['train_seconds']} s)")


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 4) if values else float("nan")
