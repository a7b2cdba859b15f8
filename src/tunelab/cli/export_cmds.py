"""``tunelab export``: a run (or any model directory / alias) as a GGUF file, optionally with an Ollama Modelfile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tunelab.cli.output_files import atomic_file, check_out_file
from tunelab.errors import TunelabError

GGUF_NAME = "model.gguf"


def register(app: typer.Typer, console: Console) -> None:
    """Add the ``export`` command to the ``tunelab`` app."""

    @app.command("export")
    def export_command(
        run: Annotated[str, typer.Argument(help="A finished run, PEFT adapter or HF model directory, or a model alias.")],
        out: Annotated[Path, typer.Option(help="Output .gguf file; with --ollama, a directory for model.gguf + Modelfile.")],
        format: Annotated[str, typer.Option("--format", help="Output format (gguf).")] = "gguf",
        quant: Annotated[str, typer.Option(help="f32, f16, bf16, q8_0, q4_0, ... or a K-quant (q4_k_m, q5_k_m, q6_k).")] = "f16",
        ollama: Annotated[bool, typer.Option(help="Also write an Ollama Modelfile (template, system, stops).")] = False,
        overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
        adapter: Annotated[bool, typer.Option(
            help="Write only the LoRA adapter as a GGUF LoRA file (llama.cpp --lora, on the base model's GGUF).")] = False,
    ) -> None:
        """Write a GGUF file that llama.cpp, Ollama and LM Studio run; a LoRA run is merged in memory first."""
        from tunelab.export.quant import check_quant

        if format != "gguf":
            raise TunelabError(f"unknown --format '{format}'; supported: gguf")
        quant = check_quant(quant)
        if adapter:
            _export_adapter(run, out, overwrite, console)
            return
        gguf_path, modelfile_path = _targets(out, ollama)
        for path in (gguf_path, modelfile_path):
            if path is not None:
                check_out_file(path, overwrite=overwrite, inputs=[run])
        written = export_run(run, gguf_path, quant, modelfile_path)
        for path in written:
            console.print(f"[bold green]wrote[/] {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        if modelfile_path is not None:
            console.print(f"run it: ollama create NAME -f {modelfile_path}")


def _export_adapter(run: str, out: Path, overwrite: bool, console: Console) -> None:
    from tunelab.export.lora_gguf import write_lora_gguf
    from tunelab.export.source import load_lora_run

    if out.suffix != ".gguf":
        raise TunelabError(f"--out {out}: give a .gguf file name for the adapter")
    check_out_file(out, overwrite=overwrite, inputs=[run])
    model, name = load_lora_run(run)
    with atomic_file(out) as tmp:
        count = write_lora_gguf(model, tmp, name=name)
    console.print(f"[bold green]wrote[/] {out}: {count} LoRA layers (llama.cpp: -m BASE.gguf --lora {out})")


def _targets(out: Path, ollama: bool) -> tuple[Path, Path | None]:
    if not ollama:
        if out.suffix != ".gguf":
            raise TunelabError(f"--out {out}: give a .gguf file name (or a directory with --ollama)")
        return out, None
    if out.suffix == ".gguf":
        return out, out.with_name("Modelfile")
    if out.exists() and not out.is_dir():
        raise TunelabError(f"--out {out} is a file; with --ollama give a directory or a .gguf path")
    return out / GGUF_NAME, out / "Modelfile"


def export_run(run: str, gguf_path: Path, quant: str, modelfile_path: Path | None = None) -> list[Path]:
    """Load ``run``, write the GGUF (and the Modelfile) atomically; returns the written paths.

    The Modelfile is derived before any weight is written, so a chat template Ollama cannot express
    costs nothing.
    """
    from tunelab.export.gguf_file import write_gguf
    from tunelab.export.ollama import modelfile
    from tunelab.export.source import load_export_source

    source = load_export_source(run)
    text = modelfile(gguf_path.name, source.tokenizer, source.system_prompt) if modelfile_path else None
    with atomic_file(gguf_path) as tmp:
        write_gguf(source.model, source.tokenizer, tmp, quant, name=source.name)
    if modelfile_path is None:
        return [gguf_path]
    with atomic_file(modelfile_path) as tmp:
        tmp.write_text(text)
    return [gguf_path, modelfile_path]
