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
    """Print ``num_examples`` examples as the config's task will see them, and dataset stats.

    ``sft``: rendered conversations with supervised tokens highlighted; ``dpo``/``reward``: prompt
    + chosen and prompt + rejected, reply tokens highlighted, with drop/truncation counts;
    ``classification``: the text as tokenized (after truncation) and its label, with label counts;
    ``grpo``/``ppo``: the rendered prompts and how many were dropped as over-long or duplicate.

    Raises:
        DataError / ConfigError: the same errors training would raise on this data.
    """
    tokenizer = load_tokenizer(config.model.name_or_path, trust_remote_code=config.model.trust_remote_code,
                               revision=config.model.revision)
    resolve_chat_template(tokenizer, config.model.chat_template, config.data.system_prompt)
    by_task = {"dpo": _inspect_pairs, "reward": _inspect_pairs, "classification": _inspect_classification,
               "grpo": _inspect_prompts, "ppo": _inspect_prompts}
    if config.task in by_task:
        by_task[config.task](config, tokenizer, num_examples, console)
        return
    data = prepare_data(config.data, tokenizer, config.train.seed)
    if data.format == "text":  # raw text: no conversations, no supervise setting; chunks share context tokens
        stride = config.data.chunk_stride or config.data.max_seq_len - 1
        console.print(f"[bold]format[/] text   [bold]max_seq_len[/] {config.data.max_seq_len}   [bold]chunk_stride[/] "
                      f"{stride}   legend: [black on green]target[/] / plain = context shared with the previous chunk")
    else:
        console.print(f"[bold]format[/] {data.format}   [bold]max_seq_len[/] {config.data.max_seq_len}   "
                      f"[bold]supervise[/] {config.data.supervise}   legend: [black on green]supervised[/] / plain = "
                      "context")
        console.print(f"[bold]rendering[/] {rendering_note(config.data.supervise, data.train_stats)}")
    for i, example in enumerate(data.train[:num_examples]):
        source = f" from {example.source}" if example.source else ""
        what = "targets" if data.format == "text" else "supervised"
        console.rule(f"train example {i}{source}: {len(example.input_ids)} tokens, {example.num_supervised} {what}")
        console.print(render_supervision(tokenizer, example))
    _print_stats(console, (("train", data.train_stats), ("held-out", data.validation_stats)))
    for name, stats in (("train", data.train_stats), ("held-out", data.validation_stats)):
        if stats.sources:
            console.print(files_table(f"{name} files", stats.sources))


def files_table(title: str, chunks_per_file, limit: int = 50) -> Table:
    """The files of one split (text-file sources) with their chunk counts after deduplication; the
    first ``limit`` by name, then how many more."""
    kept = sum(n > 0 for n in chunks_per_file.values())
    dropped = len(chunks_per_file) - kept
    table = Table(title=f"{title}: {kept}" + (f" (+ {dropped} whose chunks all duplicate others)" if dropped else ""))
    table.add_column("file")
    table.add_column("chunks")
    names = sorted(chunks_per_file)
    for name in names[:limit]:
        table.add_row(name, str(chunks_per_file[name]))
    if len(names) > limit:
        table.add_row(f"... and {len(names) - limit} more", "")
    return table


def rendering_note(supervise: str, stats) -> str:
    """How conversations became examples (see :mod:`tunelab.data.templates`), for ``data inspect``."""
    if stats.num_split:
        return (f"the chat template is not prefix-stable: {stats.num_split} conversation(s) became one example per "
                "assistant reply, each with the context the template renders when that reply is generated")
    if supervise == "last_turn":
        return "each conversation rendered once; its last assistant reply is supervised"
    return "each conversation rendered once (the template is prefix-stable on this data)"


def _inspect_pairs(config: Config, tokenizer, num_examples: int, console: Console) -> None:
    from tunelab.data.preference import prepare_pairs

    pc = config.preference
    margin = (pc.margin_field, pc.margin) if config.task == "reward" else (None, 0.0)
    data = prepare_pairs(config.data, tokenizer, config.train.seed, *margin)
    console.print(f"[bold]task[/] {config.task}   [bold]max_seq_len[/] {config.data.max_seq_len}   "
                  "legend: [black on green]reply tokens (log-probs / score span)[/] / plain = prompt")
    for i, pair in enumerate(data.train[:num_examples]):
        for side, ids, labels in (("chosen", pair.chosen_ids, pair.chosen_labels),
                                  ("rejected", pair.rejected_ids, pair.rejected_labels)):
            reply = sum(x != IGNORE_INDEX for x in labels)
            console.rule(f"train pair {i} {side}: {len(ids)} tokens, {reply} reply tokens"
                         + (f", margin {pair.margin:g}" if pair.margin else ""))
            console.print(render_supervision(tokenizer, TokenizedExample(ids, labels)))
    _print_stats(console, (("train", data.train_stats), ("held-out", data.validation_stats)),
                 note="lengths count both sequences of each pair")


def _inspect_classification(config: Config, tokenizer, num_examples: int, console: Console) -> None:
    from tunelab.data.classification import prepare_classification_data

    data = prepare_classification_data(config, tokenizer)
    cc = config.classification
    console.print(f"[bold]task[/] classification ({cc.problem_type})   [bold]labels[/] {data.labels.names}   "
                  f"[bold]max_seq_len[/] {config.data.max_seq_len} (cut on the {cc.truncation_side})")
    for i, example in enumerate(data.train[:num_examples]):
        console.rule(f"train example {i}: {len(example.input_ids)} tokens, target {_target_names(example.target, data.labels)}")
        console.print(Text(tokenizer.decode(example.input_ids)))
    _print_stats(console, (("train", data.train_stats), ("held-out", data.validation_stats)))


def _target_names(target, labels) -> str:
    if labels.problem_type == "single_label":
        return labels.names[int(target)]
    if labels.problem_type == "multi_label":
        return str([name for name, on in zip(labels.names, target) if on]) if target is not None else "none"
    return str(target)


def _inspect_prompts(config: Config, tokenizer, num_examples: int, console: Console) -> None:
    from tunelab.rollout.prompts import load_prompts

    rl = config.rl
    console.print(f"[bold]task[/] {config.task}   [bold]max_prompt_len[/] {rl.max_prompt_len}   "
                  f"[bold]max_new_tokens[/] {rl.max_new_tokens}   [bold]num_generations[/] {rl.num_generations}")
    for name, source in (("train", config.data.train), ("held-out", config.data.validation)):
        if source is None:
            continue
        limit = config.data.max_examples if name == "train" else config.data.max_validation_examples
        prompts = load_prompts(source, config.data, tokenizer, rl.max_prompt_len, limit)
        for i, prompt in enumerate(prompts.prompts[:num_examples] if name == "train" else []):
            console.rule(f"train prompt {i}: {len(prompt.input_ids)} tokens")
            console.print(Text(tokenizer.decode(prompt.input_ids)))
        console.print(_stats_table(f"{name} prompts", {
            "records": prompts.num_records, "prompts kept": len(prompts.prompts),
            "dropped: longer than rl.max_prompt_len": prompts.num_too_long,
            "dropped: duplicate prompt": prompts.num_duplicates}))
        console.print(length_histogram(prompts.kept_lengths))


def _print_stats(console: Console, named_stats, note: str = "") -> None:
    for name, stats in named_stats:
        if stats.num_records == 0:
            continue
        console.print(_stats_table(f"{name} data" + (f" ({note})" if note else ""), stats.summary()))
        console.print(length_histogram(stats.lengths))


def _stats_table(title: str, stats: dict) -> Table:
    table = Table(title=title)
    table.add_column("stat")
    table.add_column("value")
    for key, value in stats.items():
        table.add_row(key, str(value))
    return table


def render_supervision(tokenizer, example: TokenizedExample) -> Text:
    """The example's text with supervised tokens on a green background.

    Each token's text is what it adds to the decoded prefix, so tokenizers whose single-token
    decode drops spacing (WordPiece ``##`` pieces, byte-level merges) still read as the text does.
    """
    text, previous = Text(), ""
    for i, label in enumerate(example.labels):
        decoded = tokenizer.decode(example.input_ids[: i + 1])
        piece = decoded[len(previous):] if decoded.startswith(previous) else tokenizer.decode([example.input_ids[i]])
        previous = decoded
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
