"""``tunelab board``: serve the web app over a runs directory (see :mod:`tunelab.board`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


def register(app: typer.Typer, console: Console) -> None:
    """Add the ``board`` command to the ``tunelab`` app."""

    @app.command("board")
    def board_command(
        runs_dir: Annotated[Path, typer.Argument(help="Directory holding the runs (searched recursively).")] = Path("runs"),
        port: Annotated[int, typer.Option(help="Port to serve on.", min=1, max=65535)] = 7860,
        host: Annotated[str, typer.Option(
            help="Address to bind. Default: this machine only; anything else exposes the board (chat, launch) "
                 "to the network.")] = "127.0.0.1",
    ) -> None:
        """Watch, compare, chat with and launch runs in the browser (Gradio); needs the board extra."""
        import importlib.util

        from tunelab.board.app import LOCAL_HOSTS, serve
        from tunelab.errors import TunelabError

        if importlib.util.find_spec("gradio") is None:
            raise TunelabError("tunelab board needs gradio: pip install 'tunelab[board]'")
        if host not in LOCAL_HOSTS:
            Console(stderr=True).print(
                f"[bold yellow]warning:[/] serving on {host}: anyone who can reach this address can read the runs "
                f"under {runs_dir}, chat with them and start or stop training. There is no login.", highlight=False)
        if not runs_dir.is_dir():
            raise TunelabError(f"{runs_dir}: not a directory (tunelab board RUNS_DIR: the folder that holds the runs)")
        console.print(f"[bold]tunelab board[/] {runs_dir.resolve()} on http://{host}:{port}", highlight=False)
        try:
            serve(runs_dir, host, port)
        except OSError as err:  # Gradio says "Cannot find empty port" for a taken port and an unknown address
            raise TunelabError(f"tunelab board cannot listen on {host}:{port}: the port is taken or {host} is not an "
                               f"address of this machine ({err}); choose another --port or --host") from None
