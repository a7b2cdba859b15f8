"""Start, watch and stop ``tunelab train`` from the board, each run in its own background process.

A launch is the command line a person would type, ``python -m tunelab train CONFIG [overrides]
output_dir=RUNS_DIR/NAME``, started in a new session (so it outlives the board and the board's Ctrl-C
does not reach it) with its output in ``RUNS_DIR/.board/NAME.log``. Stopping sends SIGTERM: the run
finishes its step, writes a checkpoint and exits 143, so it stays resumable (``--resume`` continues it,
also from the board). The config and overrides are validated before anything starts.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from tunelab.board.runs import BOARD_DIR, inside
from tunelab.errors import TunelabError


def config_roots() -> list[Path]:
    """Folders of shipped example configs: ``./configs`` and the source tree's ``configs/`` (editable installs)."""
    here = Path(__file__).resolve().parents[3] / "configs"
    roots = [Path.cwd() / "configs", here]
    unique: list[Path] = []
    for root in roots:
        if root.is_dir() and root.resolve() not in [r.resolve() for r in unique]:
            unique.append(root)
    return unique


def shipped_configs() -> list[str]:
    """Every shipped config (``configs/**/*.yaml``), as absolute paths."""
    return sorted(str(p.resolve()) for root in config_roots() for p in root.rglob("*.yaml"))


def local_configs(runs_dir: Path) -> list[str]:
    """YAML configs lying in ``runs_dir`` itself or one folder down, outside run directories."""
    found = [*runs_dir.glob("*.yaml"), *runs_dir.glob("*/*.yaml")]
    return sorted(str(p.resolve()) for p in found if p.name != "config.yaml" and BOARD_DIR not in p.parts)


def allowed_config(runs_dir: Path, path: str) -> Path:
    """``path`` if it is a shipped config or a file inside ``runs_dir``.

    Raises:
        TunelabError: it is elsewhere, or not a file.
    """
    resolved = Path(path).resolve()
    if str(resolved) not in shipped_configs():
        resolved = inside(runs_dir, path)
    if not resolved.is_file():
        raise TunelabError(f"{path}: no such config file")
    return resolved


@dataclass
class Launch:
    """One background ``tunelab train`` started by the board."""

    name: str
    run_dir: Path
    log: Path
    command: list[str]
    process: subprocess.Popen

    def returncode(self) -> int | None:
        """The exit status once it ended (143 = stopped by SIGTERM, resumable), None while it runs."""
        return self.process.poll()


class Launcher:
    """The board's background runs, by run name (a path relative to ``runs_dir``)."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = runs_dir.resolve()
        self.launches: dict[str, Launch] = {}
        self._lock = threading.Lock()

    def start(self, config: str, name: str, overrides: str = "", *, overwrite: bool = False,
              resume: bool = False) -> Launch:
        """Validate ``config`` + ``overrides`` (whitespace-separated ``key=value``, shell quoting) and start
        training into ``runs_dir/name``.

        Raises:
            TunelabError: the config is not shipped or inside ``runs_dir``; ``name`` leaves ``runs_dir``;
                an override sets ``output_dir``; the config does not validate (the message names the key);
                a launch of this name is still running.
        """
        from tunelab.config.load import load_config

        config_path = allowed_config(self.runs_dir, config)
        if not name.strip():
            raise TunelabError("give the run a name (its directory under the runs directory)")
        run_dir = inside(self.runs_dir, name.strip())
        if run_dir == self.runs_dir or BOARD_DIR in run_dir.relative_to(self.runs_dir).parts:
            raise TunelabError(f"{name}: not a run directory name")
        items = shlex.split(overrides)
        if any(item.split("=", 1)[0].strip() == "output_dir" for item in items):
            raise TunelabError("the run name sets output_dir; remove the output_dir override")
        items.append(f"output_dir={run_dir}")
        load_config(config_path, items)  # a bad key or value: refused now, with its message
        key = str(run_dir.relative_to(self.runs_dir))
        with self._lock:
            running = self.launches.get(key)
            if running is not None and running.returncode() is None:
                raise TunelabError(f"{key} is already running (pid {running.process.pid})")
            log = self.runs_dir / BOARD_DIR / f"{key.replace(os.sep, '__')}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "tunelab", "train", str(config_path), *items]
            command += ["--resume"] if resume else (["--overwrite"] if overwrite else [])
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}  # unbuffered, tables unwrapped
            with log.open("a" if resume else "w") as out:  # a resume keeps the first attempt's output
                process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True, env=env)
            launch = self.launches[key] = Launch(key, run_dir, log, command, process)
        return launch

    def stop(self, name: str) -> str:
        """Send SIGTERM to the launch ``name``: it checkpoints its step and exits (resumable).

        Raises:
            TunelabError: no running launch of that name.
        """
        launch = self.launches.get(str(inside(self.runs_dir, name).relative_to(self.runs_dir)))
        if launch is None or launch.returncode() is not None:
            raise TunelabError(f"{name}: no run started from this board is running under that name")
        launch.process.send_signal(signal.SIGTERM)
        return f"SIGTERM sent to pid {launch.process.pid}: it finishes its step, writes a checkpoint and stops"

    def describe(self, name: str, lines: int = 30) -> str:
        """The launch's command, state and the last ``lines`` of its output."""
        launch = self.launches.get(name)
        if launch is None:
            return "not started from this board"
        code = launch.returncode()
        state = "running" if code is None else f"exited with status {code}" + \
            (" (stopped by SIGTERM, resumable)" if code == 128 + signal.SIGTERM else "")
        try:
            tail = launch.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            tail = []
        return f"$ {shlex.join(launch.command)}\npid {launch.process.pid}: {state}\n\n" + "\n".join(tail)

    def stop_all(self) -> None:
        """SIGTERM every launch still running (the board is shutting down in a test)."""
        for launch in self.launches.values():
            if launch.returncode() is None:
                launch.process.send_signal(signal.SIGTERM)
