"""The one place that writes (training/outputs/): which output paths may be written or replaced,
atomic directory writes with a marker, disk errors named by path and cause, and the run lock."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunelab.errors import OutputError
from tunelab.training import outputs
from tunelab.training.outputs import (
    LOCK_INFO, MARKER, atomic_output_dir, check_out_dir, check_out_file, check_output_dir, check_writable,
    read_marker, refuse_if_locked, run_lock, writing,
)

SRC = Path(__file__).resolve().parents[3] / "src"


def make_source_tree(root: Path) -> dict[str, str]:
    files = {"setup.py": "print('hi')\n", "src/pkg/__init__.py": "", "README.md": "# mine\n"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return files


def assert_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        assert (root / name).read_text() == text, name


def make_merged(out: Path, text: str = "weights") -> None:
    with atomic_output_dir(out, "merged") as tmp:
        (tmp / "model.safetensors").write_text(text)
        (tmp / "config.json").write_text("{}")


# --------------------------------------------------------------------- train's output_dir (items 1, 3)


def test_output_dir_with_user_files_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "config.yaml").write_text("my: config")
    for overwrite in (False, True):
        with pytest.raises(OutputError) as err:
            check_output_dir(out, resume=False, overwrite=overwrite)
        message = str(err.value)
        assert f"output_dir {out} is not empty and is not a tunelab run" in message
        assert "config.yaml, notes.txt" in message and f"output_dir={out / 'run'}" in message
    assert (out / "notes.txt").read_text() == "keep me" and (out / "config.yaml").read_text() == "my: config"


def test_output_dir_that_is_a_file_or_below_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "out", resume=False, overwrite=False)
    with pytest.raises(OutputError, match=f"lies below {tmp_path / 'out'}, which is a file"):
        check_output_dir(tmp_path / "out" / "run", resume=False, overwrite=False)


def test_empty_missing_or_bookkeeping_only_output_dirs_are_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", resume=False, overwrite=False) is None
    assert check_output_dir(tmp_path / "new", resume=False, overwrite=False) is None
    failed_early = tmp_path / "failed-early"  # a run that stopped on bad data before writing anything
    failed_early.mkdir()
    outputs.write_marker(failed_early, "run")
    (failed_early / outputs.LOCK).write_text("")
    assert check_output_dir(failed_early, resume=False, overwrite=False) is None


@pytest.mark.parametrize("leftover", ["metrics.jsonl", "before_training.json", "checkpoints/step-000002/state.json",
                                      "reference_logps/train.pt", "tunelab.json", "MARKER+config.yaml"])
def test_an_interrupted_run_is_refused_like_a_finished_one(tmp_path, leftover):
    """Item 3: a plain re-run onto an interrupted run (no tunelab.json) is refused; the old code restarted
    it when it held only metrics or before-training results, replacing them."""
    run = tmp_path / "run"
    for name in leftover.split("+"):
        if name == "MARKER":
            run.mkdir(exist_ok=True)
            outputs.write_marker(run, "run")
        else:
            (run / name).parent.mkdir(parents=True, exist_ok=True)
            (run / name).write_text("{}")
    with pytest.raises(OutputError, match="already holds") as err:
        check_output_dir(run, resume=False, overwrite=False)
    assert ("--resume" in str(err.value)) == leftover.startswith("checkpoints")
    assert ("(interrupted: no tunelab.json yet" in str(err.value)) == (leftover != "tunelab.json")
    assert check_output_dir(run, resume=False, overwrite=True) is None


def test_a_merged_model_dir_is_not_a_run_dir(tmp_path):
    make_merged(tmp_path / "merged")
    with pytest.raises(OutputError, match="is a tunelab merged model"):
        check_output_dir(tmp_path / "merged", resume=False, overwrite=True)


# --------------------------------------------------------------------- merge/export --out (item 1)


def test_overwrite_never_replaces_a_source_tree(tmp_path):
    files = make_source_tree(tmp_path / "project")
    with pytest.raises(OutputError, match="not written by tunelab") as err:
        check_out_dir(tmp_path / "project", overwrite=True)
    assert "README.md, setup.py, src" in str(err.value)
    assert_tree(tmp_path / "project", files)


def test_overwrite_never_replaces_the_input_a_parent_of_it_or_the_working_directory(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "adapter_model.safetensors").write_text("w")
    with pytest.raises(OutputError, match="which this command reads"):
        check_out_dir(run, overwrite=True, inputs=[run])
    with pytest.raises(OutputError, match=f"holds {run}"):
        check_out_dir(tmp_path / "runs", overwrite=True, inputs=[run])
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work / "sub")
    with pytest.raises(OutputError, match="is the working directory"):
        check_out_dir(Path("."), overwrite=True)
    with pytest.raises(OutputError, match="working directory or a parent of it"):
        check_out_dir(Path(".."), overwrite=True)
    assert (run / "adapter_model.safetensors").read_text() == "w"


def test_overwrite_replaces_only_an_earlier_merge_holding_nothing_else(tmp_path):
    out = tmp_path / "merged"
    check_out_dir(out, overwrite=False)  # new: fine
    make_merged(out, "old")
    marker = read_marker(out)
    assert marker["kind"] == "merged" and marker["files"] == ["config.json", "model.safetensors"]
    with pytest.raises(OutputError, match="earlier tunelab merged output; pass --overwrite"):
        check_out_dir(out, overwrite=False)
    check_out_dir(out, overwrite=True)
    make_merged(out, "new")
    assert (out / "model.safetensors").read_text() == "new"
    (out / "my-notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds files tunelab did not write there \\(my-notes.txt\\)"):
        check_out_dir(out, overwrite=True)


def test_a_run_directory_is_never_replaced_by_merge(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    outputs.write_marker(run, "run")
    (run / "tunelab.json").write_text("{}")
    with pytest.raises(OutputError, match="is a tunelab run directory"):
        check_out_dir(run, overwrite=True)


def test_out_dir_that_is_or_lies_below_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match="is a file"):
        check_out_dir(tmp_path / "f", overwrite=True)
    with pytest.raises(OutputError, match="which is a file"):
        check_out_dir(tmp_path / "f" / "merged", overwrite=True)


def test_atomic_output_dir_keeps_the_old_directory_when_writing_fails(tmp_path):
    out = tmp_path / "merged"
    make_merged(out, "old")
    with pytest.raises(RuntimeError), atomic_output_dir(out, "merged") as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("killed")
    assert (out / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary directory left


# --------------------------------------------------------------------- --out files


def test_out_file_never_replaces_an_input_or_a_file_inside_an_input_dir(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_model.safetensors").write_text("w")
    with pytest.raises(OutputError, match="which this command reads"):
        check_out_file(data, overwrite=True, inputs=[run, data])
    with pytest.raises(OutputError, match=f"inside {run}"):
        check_out_file(run / "adapter_model.safetensors", overwrite=True, inputs=[run, data])
    check_out_file(run / "predictions.jsonl", overwrite=False, inputs=[run, data])  # a new file beside is fine
    check_out_file(tmp_path / "old.jsonl", overwrite=True, inputs=[run, data, "builtin:x"])


def test_out_file_below_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match="its directory .* is a file, not a directory"):
        check_out_file(tmp_path / "f" / "preds.jsonl", overwrite=False)


# --------------------------------------------------------------------- disk errors (item 8)


def test_writing_names_the_path_and_cause_of_a_full_disk(tmp_path):
    with pytest.raises(OutputError) as err, writing("checkpoints/step-000040", tmp_path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(err.value).startswith(f"no space left on device while writing checkpoints/step-000040 in {tmp_path}")
    # safetensors wraps the OS error in its own exception type, with the message in its text
    with pytest.raises(OutputError, match="no space left on device while writing"), writing(tmp_path / "x"):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(KeyError), writing(tmp_path / "x"):  # anything else is not the disk's fault
        raise KeyError("bug")


def test_writing_reports_what_a_probe_write_finds_when_the_error_does_not_say(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs.writes, "probe_write", lambda d: OSError(errno.EROFS, os.strerror(errno.EROFS)))
    with pytest.raises(OutputError, match="read-only file system while writing"), writing(tmp_path / "x"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def test_an_unreadable_input_is_named_as_itself(tmp_path):
    with pytest.raises(OutputError, match=r"^permission denied: /data/train.jsonl$"), writing(tmp_path):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/train.jsonl")


def test_check_writable_finds_a_read_only_or_full_directory_before_any_work(tmp_path, monkeypatch):
    check_writable(tmp_path / "new" / "run")  # a missing directory: its nearest parent is probed
    monkeypatch.setattr(outputs.writes, "probe_write", lambda d: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(OutputError, match=f"cannot write output_dir {tmp_path / 'run'}: no space left on device"):
        check_writable(tmp_path / "run")


def test_a_read_only_filesystem_is_refused_by_name(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        with pytest.raises(OutputError, match="read-only file system"):
            check_writable(mount / "run")
        with pytest.raises(OutputError, match="read-only file system"):
            check_out_file(mount / "preds.jsonl", overwrite=False)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# --------------------------------------------------------------------- the run lock (item 2)

HOLDER = """
import sys, time
from pathlib import Path
from tunelab.training.outputs import run_lock
with run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_process_is_refused_by_pid_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        info = json.loads((run / LOCK_INFO).read_text())
        assert info["pid"] == holder.pid
        with pytest.raises(OutputError) as err, run_lock(run):
            pass
        message = str(err.value)
        assert f"pid {holder.pid}" in message and "started " in message and "ago" in message
        with pytest.raises(OutputError, match=f"pid {holder.pid}"):  # merge/export/predict into it
            refuse_if_locked(run / "merged", "--out")
        with pytest.raises(OutputError, match=f"pid {holder.pid}"):
            check_out_file(run / "preds.jsonl", overwrite=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    started = time.perf_counter()
    with run_lock(run):  # kill -9 released it: no stale lock, no waiting
        assert json.loads((run / LOCK_INFO).read_text())["pid"] == os.getpid()
    assert time.perf_counter() - started < 1
    assert not (run / LOCK_INFO).exists()
    refuse_if_locked(run / "merged", "--out")


def test_the_lock_is_held_until_the_block_ends_in_one_process_too(tmp_path):
    with run_lock(tmp_path / "run"):
        with pytest.raises(OutputError, match=f"pid {os.getpid()}"), run_lock(tmp_path / "run"):
            pass
    with run_lock(tmp_path / "run"):
        pass
    assert MARKER not in os.listdir(tmp_path / "run")  # the lock alone marks nothing


def test_a_decorated_train_holds_the_lock_from_its_output_check_until_it_returns_or_raises(tmp_path):
    from types import SimpleNamespace

    from tunelab.training.outputs import holds_run_lock

    config = SimpleNamespace(output_dir=str(tmp_path / "run"))
    seen = []

    @holds_run_lock
    def train(config, *, fail_early=False, fail_late=False):
        if fail_early:  # a recipe's own early refusal: nothing may have been created yet
            seen.append((tmp_path / "run").exists())
            raise OutputError("refused early")
        check_output_dir(Path(config.output_dir), resume=False, overwrite=False)
        with pytest.raises(OutputError, match=f"pid {os.getpid()}"), run_lock(Path(config.output_dir)):
            pass
        seen.append(read_marker(Path(config.output_dir))["kind"])
        if fail_late:
            raise RuntimeError("a bug")
        return "done"

    with pytest.raises(OutputError, match="refused early"):
        train(config, fail_early=True)
    assert seen == [False] and not (tmp_path / "run").exists()
    with pytest.raises(RuntimeError):
        train(config, fail_late=True)
    assert train(config) == "done" and seen[1:] == ["run", "run"]
    with run_lock(tmp_path / "run"):  # released after both
        pass
