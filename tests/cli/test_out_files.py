"""`--out FILE` of predict/eval/score/generate-rejected: an existing file is kept unless --overwrite,
and a failed write leaves the old file as it was."""

import pytest
from typer.testing import CliRunner

from tunelab.cli.app import app
from tunelab.training.outputs import atomic_file, check_out_file
from tunelab.errors import TunelabError


def test_check_out_file_refuses_an_existing_file_unless_overwrite(tmp_path):
    out = tmp_path / "preds.jsonl"
    check_out_file(out, overwrite=False)
    out.write_text("old\n")
    with pytest.raises(TunelabError, match=rf"--out {out} already exists; pass --overwrite"):
        check_out_file(out, overwrite=False)
    check_out_file(out, overwrite=True)
    with pytest.raises(TunelabError, match="is a directory"):
        check_out_file(tmp_path, overwrite=True)


def test_atomic_file_replaces_only_on_success(tmp_path):
    out = tmp_path / "sub" / "scores.jsonl"
    with atomic_file(out) as tmp:
        assert tmp.parent == out.parent and tmp.suffix == ".jsonl"
        tmp.write_text("first\n")
    assert out.read_text() == "first\n"
    with pytest.raises(RuntimeError), atomic_file(out) as tmp, tmp.open("w") as f:
        f.write("half of the sec")
        raise RuntimeError("interrupted")
    assert out.read_text() == "first\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["scores.jsonl"]  # no temp file left


@pytest.mark.parametrize("args", [
    ["predict", "RUN", "--data", "d.jsonl", "--out", "OUT"],
    ["eval", "RUN", "--data", "d.jsonl", "--out", "OUT"],
    ["score", "RUN", "--data", "d.jsonl", "--out", "OUT"],
    ["generate-rejected", "--data", "d.jsonl", "--model", "smollm2-135m-instruct", "--out", "OUT"],
])
def test_commands_refuse_an_existing_out_file_before_any_work(tmp_path, args):
    out = tmp_path / "existing.jsonl"
    out.write_text("keep me\n")
    argv = [str(out) if a == "OUT" else str(tmp_path / "no-run") if a == "RUN" else a for a in args]
    result = CliRunner().invoke(app, argv)
    assert isinstance(result.exception, TunelabError), result.output
    assert f"--out {out} already exists; pass --overwrite" in str(result.exception)
    assert out.read_text() == "keep me\n"
    result = CliRunner().invoke(app, [*argv, "--overwrite"])  # gets past the check; fails on the missing run/data
    assert "already exists" not in str(result.exception)
    assert out.read_text() == "keep me\n"
