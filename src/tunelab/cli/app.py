"""The ``tunelab`` command. User errors print one clear message and exit 2, without a traceback."""

from __future__ import annotations

import importlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from tunelab.errors import TunelabError
from tunelab.training.interrupt import RunInterrupted

app = typer.Typer(help="Fine-tune pre-trained models with one command.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Look at training data before training.", no_args_is_help=True)
config_app = typer.Typer(help="Work with config files.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
console = Console()
error_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file.")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="Dotted overrides, e.g. train.lr=1e-4 lora.r=32.")]


@app.command()
def train(
    config: ConfigArg, overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in output_dir.")] = False,
    resume_from: Annotated[Optional[Path], typer.Option(help="Continue from this checkpoint directory.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run in output_dir.")] = False,
    nproc: Annotated[Optional[int], typer.Option(
        min=1, help="Launch N processes on this machine with torchrun (see distributed.strategy).")] = None,
) -> None:
    """Train as the config says (``task`` picks the recipe)."""
    from tunelab.config.load import load_config

    if nproc is not None:
        from tunelab.training.distributed import launch_local

        if nproc > 1 and load_config(config, overrides or []).model.quantize != "none":  # before torchrun starts
            raise TunelabError("model.quantize is not supported with several processes (--nproc > 1): train on one "
                               "process or set model.quantize=none")
        raise typer.Exit(launch_local(nproc, sys.argv[1:]))
    from tunelab.recipes import get_recipe

    from tunelab.training.outputs import refuse_if_locked

    cfg = load_config(config, overrides or [])
    refuse_if_locked(Path(cfg.output_dir), "train")  # at once; the recipe takes the lock itself (training/outputs/)
    get_recipe(cfg.task)(cfg, resume=str(resume_from) if resume_from else resume, overwrite=overwrite, console=console)


@app.command()
def chat(
    run_dir: Annotated[Path, typer.Argument(help="A finished run (or any HF model / PEFT adapter directory).")],
    prompt: Annotated[Optional[str], typer.Option(help="Answer this one message and exit.")] = None,
    system: Annotated[Optional[str], typer.Option(help="System message.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Reply budget in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
) -> None:
    """Talk to a trained model; replies stream token by token. Empty line or Ctrl-D quits."""
    from transformers import TextStreamer

    from tunelab.adapters.lora import merge_lora
    from tunelab.models.generate import generate_replies
    from tunelab.models.run import load_run, read_run_info

    info = read_run_info(run_dir)
    if info.get("task_type") == "SEQ_CLS":
        raise TunelabError(f"{run_dir} is a classification or reward-model run, not a chat model: use "
                           f"`tunelab predict {run_dir} --data FILE --out OUT` or `tunelab score {run_dir} --data FILE`")
    model, tokenizer, _ = load_run(run_dir)
    if not tokenizer.chat_template:
        raise TunelabError(f"{run_dir}: its tokenizer has no chat template, so there is no way to render a "
                           "conversation; chat needs a model trained with one (set model.chat_template when training)")
    merge_lora(model)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    history = [{"role": "system", "content": system}] if system else []
    while True:
        message = prompt if prompt is not None else _read_user()
        if not message:
            return
        history.append({"role": "user", "content": message})
        console.print("[bold green]assistant>[/] ", end="")
        reply = generate_replies(model, tokenizer, [history], max_new_tokens=max_new_tokens, streamer=streamer,
                                 do_sample=temperature > 0, temperature=temperature or 1.0)[0]
        history.append({"role": "assistant", "content": reply})
        if prompt is not None:
            return


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A finished LoRA run or PEFT adapter directory.")],
    out: Annotated[Path, typer.Option(help="Output directory for the merged model.")],
    overwrite: Annotated[bool, typer.Option(
        help="Replace an earlier merge/export in --out (only a directory tunelab wrote, holding nothing else).")] = False,
) -> None:
    """Merge a LoRA adapter into its base model and save a plain transformers model directory."""
    from tunelab.adapters.lora import merge_lora
    from tunelab.models.run import load_run, log_stop_ids
    from tunelab.models.stop_config import apply_stop_ids
    from tunelab.training.outputs import atomic_output_dir, check_out_dir

    check_out_dir(out, overwrite=overwrite, inputs=[run_dir])
    model, tokenizer, info = load_run(run_dir)  # a classifier run loads as a classifier
    if info["method"] != "lora":
        raise TunelabError(f"{run_dir} is a {info['method']} fine-tune, not a LoRA adapter: nothing to merge")
    merge_lora(model)
    quantized = info.get("base_quantization")
    if quantized:  # recorded where any transformers reader sees it, too
        model.config.tunelab_merged_into_dequantized_base = quantized
    stop_ids = apply_stop_ids(model, tokenizer) if info.get("task_type", "CAUSAL_LM") == "CAUSAL_LM" else []
    check_out_dir(out, overwrite=overwrite, inputs=[run_dir])  # again: a run may have taken it meanwhile
    with atomic_output_dir(out, "merged") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "tunelab.json").write_text(json.dumps(merged_run_info(run_dir, info), indent=2))
    if stop_ids:
        log_stop_ids(console, out, tokenizer, stop_ids)
    how = f" (into the dequantized {quantized['format']} base it was trained on)" if quantized else ""
    causal = info.get("task_type", "CAUSAL_LM") == "CAUSAL_LM"
    loader = "AutoModelForCausalLM" if causal else "AutoModelForSequenceClassification"
    console.print(f"[bold green]merged[/] {run_dir} into {out}{how} (loads with {loader}.from_pretrained)")
    pooling = _run_pooling(run_dir)
    if not causal and pooling == "mean":
        console.print("[yellow]note:[/] this classifier was trained with classification.pooling: mean; transformers' "
                      "own head reads the first token, so AutoModelForSequenceClassification scores of the merged model differ "
                      f"from training; tunelab predict/eval on {run_dir} apply the run's pooling")


def _run_pooling(run_dir: Path) -> str | None:
    """``classification.pooling`` of the run's config.yaml, if any."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    return ((config.get("classification") or {}) if isinstance(config, dict) else {}).get("pooling")


def merged_run_info(run_dir: Path, info: dict) -> dict:
    """``tunelab.json`` of a merged model: a full model now, saying what it was merged from and, for a
    QLoRA run, that the adapter went into the dequantized base weights it was trained against."""
    from tunelab import __version__

    merged = {"tunelab_version": __version__, "method": "full", "merged_from": str(run_dir),
              "base_model": info.get("base_model"), "task_type": info.get("task_type", "CAUSAL_LM")}
    if info.get("base_quantization"):
        merged["base_quantization"] = info["base_quantization"]
        merged["merged_into"] = (f"the {info['base_quantization']['format']}-dequantized base weights the adapter "
                                 "was trained against (not the original full-precision base)")
    return merged


@data_app.command("inspect")
def data_inspect(
    config: ConfigArg, overrides: Overrides = None,
    num_examples: Annotated[int, typer.Option("-n", "--num-examples", help="Examples to print.")] = 3,
) -> None:
    """Rendered examples with supervised tokens highlighted, token counts, drops and length histogram."""
    from tunelab.cli.inspect_data import inspect_data
    from tunelab.config.load import load_config

    inspect_data(load_config(config, overrides or []), num_examples, console)


@config_app.command("show")
def config_show(config: ConfigArg, overrides: Overrides = None) -> None:
    """Print the fully resolved config (every key, defaults filled in)."""
    from tunelab.config.load import dump_config, load_config

    print(dump_config(load_config(config, overrides or [])), end="")


@config_app.command("reference")
def config_reference() -> None:
    """Print every config key with its default and meaning (markdown)."""
    from tunelab.config.reference import config_reference_markdown

    print(config_reference_markdown(), end="")


# Task-specific commands live in their own modules; each has `register(app, console)`.
COMMAND_MODULES: tuple[str, ...] = (
    "tunelab.cli.classify_cmds", "tunelab.cli.preference_cmds", "tunelab.cli.export_cmds", "tunelab.cli.board_cmd",
)
for _module in COMMAND_MODULES:
    importlib.import_module(_module).register(app, console)


def _read_user() -> str:
    try:
        return console.input("[bold blue]you>[/] ").strip()
    except EOFError:
        return ""


def _quiet_libraries() -> None:
    """Hide library progress bars for steps that take well under a second (loading, datasets)."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


def main() -> None:
    """Console-script entry point."""
    from tunelab.training.outputs import environment_error_message

    _quiet_libraries()
    try:
        app()
    except TunelabError as err:
        _print_error(str(err))
        sys.exit(2)
    except OSError as err:  # the environment (permissions, full disk, read-only filesystem), not a bug
        message = environment_error_message(err)
        if message is None:
            raise
        _print_error(message)
        sys.exit(2)
    except RunInterrupted as stop:
        if os.environ.get("RANK", "0") == "0":
            from rich.markup import escape  # the command may hold [a,b] list overrides: print it verbatim

            launcher = " (under the same torchrun launcher)" if "LOCAL_RANK" in os.environ else ""
            error_console.print(f"[yellow]stopped[/]: {escape(str(stop))}. Continue with{launcher}:\n  "
                                f"{escape(resume_command(sys.argv[1:]))}", highlight=False, soft_wrap=True)
        sys.exit(stop.exit_status)
    except KeyboardInterrupt:
        error_console.print("[yellow]interrupted[/]")
        sys.exit(130)


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted ``tunelab ARGV``: the same arguments with
    ``--resume`` instead of ``--overwrite``/``--resume-from PATH``/``--resume``, shell-quoted."""
    from tunelab.training.distributed import strip_options

    kept = strip_options(argv, flags=("--overwrite", "--resume"), with_value=("--resume-from",))
    return shlex.join(["tunelab", *kept, "--resume"])


def _print_error(message: str) -> None:
    """One error line on stderr (stdout stays the command's output), naming the rank under torchrun."""
    from rich.markup import escape

    where = f" (rank {os.environ.get('RANK')})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    error_console.print(f"[bold red]error{where}:[/] {escape(message)}", highlight=False, soft_wrap=True)
