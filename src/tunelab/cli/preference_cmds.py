"""Preference commands: ``tunelab score`` (reward-model scores and pairwise accuracy) and
``tunelab generate-rejected`` (build DPO pairs: chosen = the corpus answer, rejected = a model's
own greedy answer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from tunelab.cli.output_files import OverwriteOutOpt, atomic_file, check_out_file
from tunelab.errors import TunelabError

DataOpt = Annotated[str, typer.Option(help="Local .jsonl/.json/.csv/.parquet, builtin:NAME or a hub dataset id.")]
NameOpt = Annotated[Optional[str], typer.Option(help="Subset / config name of a built-in or hub dataset.")]
SplitOpt = Annotated[str, typer.Option(help="Split of a built-in or hub dataset.")]


def register(app: typer.Typer, console: Console) -> None:
    """Add ``score`` and ``generate-rejected`` to the ``tunelab`` app."""

    @app.command()
    def score(
        run_dir: Annotated[Path, typer.Argument(help="A finished reward-model run (task: reward).")],
        data: DataOpt, name: NameOpt = None, split: SplitOpt = "train",
        batch_size: Annotated[int, typer.Option(help="Pairs per forward pass.")] = 8,
        max_seq_len: Annotated[Optional[int], typer.Option(help="Tokens per sequence (default: the run's).")] = None,
        out: Annotated[Optional[Path], typer.Option(help="Write per-pair scores here (JSONL).")] = None,
        show: Annotated[int, typer.Option(help="Pairs to print.")] = 5,
        overwrite: OverwriteOutOpt = False,
    ) -> None:
        """Score prompt/chosen/rejected pairs with a reward model: pairwise accuracy (95% CI), margins."""
        score_pairs(run_dir, data, name, split, batch_size, max_seq_len, out, show, console, overwrite=overwrite)

    @app.command("generate-rejected")
    def generate_rejected(
        data: DataOpt,
        out: Annotated[Path, typer.Option(help="Output JSONL of prompt/chosen/rejected records.")],
        model: Annotated[str, typer.Option(help="Model alias, directory, .gguf file or finished run.")],
        name: NameOpt = None, split: SplitOpt = "train",
        max_new_tokens: Annotated[int, typer.Option(help="Reply budget in tokens.")] = 64,
        batch_size: Annotated[int, typer.Option(help="Prompts per generate() call.")] = 16,
        limit: Annotated[Optional[int], typer.Option(help="Use only the first N records.")] = None,
        threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch.")] = None,
        overwrite: OverwriteOutOpt = False,
    ) -> None:
        """Make DPO pairs from a conversation dataset: chosen = its last assistant reply, rejected =
        the model's own greedy reply to the same prompt."""
        write_rejected_pairs(data, name, split, out, model, max_new_tokens, batch_size, limit, threads, console,
                             overwrite=overwrite)


def score_pairs(run_dir: Path, data: str, name: str | None, split: str, batch_size: int, max_seq_len: int | None,
                out: Path | None, show: int, console: Console, *, overwrite: bool = False) -> dict[str, float]:
    """Score every pair of ``data`` with the reward model in ``run_dir``; returns the summary.

    ``out`` (per-pair scores, JSONL) may not exist unless ``overwrite``; it is written atomically
    (see :mod:`tunelab.training.outputs`).
    """
    from transformers import AutoModelForSequenceClassification

    from tunelab.config.schema import DataConfig, DataSource
    from tunelab.data.preference import PairTokenizer, load_preference_examples, preference_collate
    from tunelab.data.tokenize import DataStats
    from tunelab.models.run import load_run, read_run_info
    from tunelab.recipes.reward import pairwise_summary, score_batches

    if out is not None:
        check_out_file(out, overwrite=overwrite, inputs=[run_dir, data])
    if read_run_info(run_dir).get("task_type") != "SEQ_CLS":
        raise TunelabError(f"{run_dir} is not a reward-model run (train one with task: reward)")
    model, tokenizer, _ = load_run(run_dir, AutoModelForSequenceClassification, num_labels=1)
    max_seq_len = max_seq_len or _run_max_seq_len(run_dir)
    cfg = DataConfig(train=DataSource(path=data, name=name, split=split), max_seq_len=max_seq_len)
    encode, stats, pairs, kept = PairTokenizer(tokenizer, max_seq_len), DataStats(), [], []
    for example in load_preference_examples(cfg.train, cfg):
        pair = encode(example, stats, index=len(pairs))
        if pair is not None:
            pairs.append(pair)
            kept.append(example)
    if not pairs:
        raise TunelabError(f"{data}: no pair left to score (dropped: {dict(stats.dropped)})")
    batches = [preference_collate(pairs[i:i + batch_size], tokenizer.pad_token_id)
               for i in range(0, len(pairs), batch_size)]
    import torch

    chosen, rejected = score_batches(model, batches, torch.device("cpu"))
    summary = pairwise_summary(chosen, rejected)
    if out is not None:
        with atomic_file(out) as tmp, tmp.open("w", encoding="utf-8") as f:
            for example, c, r in zip(kept, chosen.tolist(), rejected.tolist()):
                f.write(json.dumps({"prompt": example["prompt"], "chosen_score": c, "rejected_score": r}) + "\n")
    table = Table(title=f"{run_dir} on {data} ({split})")
    for col in ("chosen (start)", "score", "rejected (start)", "score"):
        table.add_column(col)
    for example, c, r in list(zip(kept, chosen.tolist(), rejected.tolist()))[:show]:
        table.add_row(_snippet(example["chosen"]), f"{c:+.3f}", _snippet(example["rejected"]), f"{r:+.3f}")
    console.print(table)
    console.print(f"pairwise accuracy [bold]{summary['accuracy']:.3f}[/] (95% CI {summary['accuracy_low']:.3f}-"
                  f"{summary['accuracy_high']:.3f}, {summary['pairs']} pairs; dropped {dict(stats.dropped) or 0}), "
                  f"mean margin {summary['margin']:+.4f}")
    return summary


def _run_max_seq_len(run_dir: Path) -> int:
    import yaml

    path = Path(run_dir) / "config.yaml"
    if path.is_file():
        return int(yaml.safe_load(path.read_text())["data"]["max_seq_len"])
    return 512


def _snippet(reply: Any, width: int = 60) -> str:
    from tunelab.data.preference import reply_text

    text = " ".join(reply_text(reply).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def write_rejected_pairs(data: str, name: str | None, split: str, out: Path, model_ref: str, max_new_tokens: int,
                         batch_size: int, limit: int | None, threads: int | None, console: Console, *,
                         overwrite: bool = False) -> dict[str, int]:
    """Write ``{"prompt", "chosen", "rejected"}`` JSONL: for each conversation record, prompt = the turns
    before its last assistant reply (a string when that is a single user turn), chosen = that reply,
    rejected = ``model_ref``'s greedy reply. Pairs whose two replies are equal or empty are skipped
    and counted. Returns the counts. ``out`` may not exist unless ``overwrite``; it is written
    atomically (see :mod:`tunelab.training.outputs`)."""
    import torch

    from tunelab.config.schema import DataSource
    from tunelab.data.formats import detect_format, to_example
    from tunelab.data.sources import load_records
    from tunelab.models.generate import generate_replies

    check_out_file(out, overwrite=overwrite, inputs=[data, model_ref])
    if threads:
        torch.set_num_threads(threads)
    records = load_records(DataSource(path=data, name=name, split=split))[:limit]
    if not records:
        raise TunelabError(f"{data}: no records")
    fmt = detect_format(records[0], {}, where=f"{data} record #1")
    items = []
    for i, record in enumerate(records, start=1):
        messages = to_example(record, fmt, {}, where=f"{data} record #{i}").get("messages")
        last = max((j for j, m in enumerate(messages or []) if m["role"] == "assistant"), default=0)
        if last == 0:
            raise TunelabError(f"{data} record #{i}: needs a conversation ending in an assistant reply")
        items.append((messages[:last], messages[last]["content"]))
    model, tokenizer = _load_generator(model_ref)
    unique = list({json.dumps(p): p for p, _ in items}.values())
    replies: dict[str, str] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start:start + batch_size]
        for prompt, reply in zip(chunk, generate_replies(model, tokenizer, chunk, max_new_tokens=max_new_tokens)):
            replies[json.dumps(prompt)] = reply
        console.print(f"generated {min(start + batch_size, len(unique))}/{len(unique)} replies")
    counts = {"written": 0, "skipped_equal": 0, "skipped_empty": 0}
    with atomic_file(out) as tmp, tmp.open("w", encoding="utf-8") as f:
        for prompt, chosen in items:
            rejected = replies[json.dumps(prompt)]
            if not rejected.strip() or not chosen.strip():
                counts["skipped_empty"] += 1
            elif rejected.strip() == chosen.strip():
                counts["skipped_equal"] += 1
            else:
                single = len(prompt) == 1 and prompt[0]["role"] == "user"
                f.write(json.dumps({"prompt": prompt[0]["content"] if single else prompt, "chosen": chosen,
                                    "rejected": rejected}, ensure_ascii=False) + "\n")
                counts["written"] += 1
    console.print(f"[bold green]wrote[/] {out}: {counts}")
    return counts


def _load_generator(model_ref: str) -> tuple[Any, Any]:
    """Model and tokenizer to generate with: an alias, model directory, or a finished run (a LoRA run merged
    into its base, recursively: :func:`tunelab.models.run.load_weights`)."""
    from tunelab.models.run import load_start_tokenizer, load_weights

    return load_weights(model_ref).eval(), load_start_tokenizer(model_ref)
