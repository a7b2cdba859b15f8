"""``tunelab data inspect``: what the model will learn, before spending compute on it."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tunelab.config.schema import Config
from tunelab.data.pipeline import prepare_data
from tunelab.data.templates import resolve_chat_template
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
from tunelab.models.loading import load_tokenizer


def inspect_data(config: Config, num_examples: int, console: Console) -> None:
    """Print ``num_examples`` rendered examples with supervised tokens highlighted, and dataset stats."""
    tokenizer = load_tokenizer(config.model.name_or_path, trust_remote_code=config.model.trust_remote_code,
                               revision=config.model.revision)
    resolve_chat_template(tokenizer, config.model.chat_template)
    data = prepare_data(config.data, tokenizer, config.train.seed)
    console.print(f"[bold]format[/] {data.format}   [bold]max_seq_len[/] {config.data.max_seq_len}   "
                  f"[bold]supervise[/] {config.data.supervise}   legend: [black on green]supervised[/] / plain = context")
    for i, example in enumerate(data.train[:num_examples]):
        console.rule(f"train example {i}: {len(example.input_ids)} tokens, {example.num_supervised} supervised")
        console.print(render_supervision(tokenizer, example))
    for name, stats in (("train", data.train_stats), ("held-out", data.validation_stats)):
        if stats.num_records == 0:
            continue
        table = Table(title=f"{name} data")
        table.add_column("stat")
        table.add_column("value")
        for key, value in stats.summary().items():
            table.add_row(key, str(value))
        console.print(table)
        console.print(length_histogram(stats.lengths))


def render_supervision(tokenizer, example: TokenizedExample) -> Text:
    """The example's text with supervised tokens on a green background."""
    text = Text()
    for token_id, label in zip(example.input_ids, example.labels):
        piece = tokenizer.decode([token_id])
        text.append(piece, style="black on green" if label != IGNORE_INDEX else "")
    return text


def length_histogram(lengths: list[int], bins: int = 10, width: int = 40) -> str:
    """A text histogram of example lengths in tokens."""
    if not lengths:
        return ""
    lo, hi = min(lengths), max(lengths)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((n - lo) // step for n in lengths)
    top = max(counts.values())
    lines = [f"length histogram (tokens), {len(lengths)} examples, min {lo}, max {hi}"]
    for b in range(-(-(hi - lo + 1) // step)):
        start = lo + b * step
        lines.append(f"{start:>6}-{start + step - 1:<6} {'#' * round(width * counts.get(b, 0) / top):<{width}} {counts.get(b, 0)}")
    return "\n".join(lines)
