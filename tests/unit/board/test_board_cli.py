"""`tunelab board` refuses what it cannot serve with one message naming the option (breaker findings: a
taken port and an out-of-range port were tracebacks; a missing RUNS_DIR printed the serving line first)."""

from __future__ import annotations

import socket

import pytest
from typer.testing import CliRunner

from tunelab.cli.app import app
from tunelab.errors import TunelabError

pytest.importorskip("gradio")


def test_a_taken_port_names_port_and_host(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["board", str(tmp_path), "--port", str(port)])
    assert isinstance(result.exception, TunelabError)  # the CLI prints it as one line and exits 2
    assert f"cannot listen on 127.0.0.1:{port}" in str(result.exception) and "--port" in str(result.exception)


def test_port_out_of_range_and_missing_runs_dir(tmp_path):
    result = CliRunner().invoke(app, ["board", str(tmp_path), "--port", "99999"])
    assert result.exit_code == 2 and "65535" in result.output
    result = CliRunner().invoke(app, ["board", str(tmp_path / "nope")])
    assert "not a directory" in (result.output + str(result.exception)) and "on http://" not in result.output
