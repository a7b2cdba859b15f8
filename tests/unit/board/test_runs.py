"""Issue 20, ``tunelab board`` readers (no browser): run status from the lock, checkpoints and
``tunelab.json``; paths outside RUNS_DIR refused; curves that follow a growing file; config diff and
before/after tables; launches refused outside RUNS_DIR. (Fails on the old code: no board existed.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tunelab.board import compare, runs
from tunelab.board.launch import Launcher
from tunelab.errors import TunelabError
from tunelab.training.manifest import write_manifest
from tunelab.training.outputs import lock_holder, run_lock


def _run(root: Path, name: str, *, steps: int = 3, checkpoint: int | None = None, finished: bool = False,
         config: dict | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(json.dumps(config or {"task": "sft", "model": {"name_or_path": "tiny"},
                                                           "train": {"method": "lora", "max_steps": steps}}))
    lines = [{"step": s, "loss": 3.0 - s * 0.5, "lr": 1e-3, "step_s": 0.5} for s in range(1, steps + 1)]
    lines.append({"step": steps, "eval/loss": 1.25, "eval/ppl": 3.49})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if checkpoint is not None:
        ckpt = run / "checkpoints" / f"step-{checkpoint:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "state.json").write_text("{}")
        write_manifest(ckpt)
    if finished:
        (run / "tunelab.json").write_text(json.dumps({"results": {"steps": steps, "train_seconds": 12.5}}))
    return run


def test_status_of_finished_interrupted_failed_and_running_runs(tmp_path):
    finished = _run(tmp_path, "done", checkpoint=3, finished=True)
    interrupted = _run(tmp_path, "cut", checkpoint=2)
    failed = _run(tmp_path, "crashed")
    damaged = _run(tmp_path, "damaged", checkpoint=2)
    (damaged / "checkpoints" / "step-000002" / "state.json").write_text('{"x": 1}')  # no longer matches its sha256
    assert runs.run_status(finished) == runs.FINISHED
    assert runs.run_status(interrupted) == runs.INTERRUPTED
    assert runs.run_status(failed) == runs.FAILED
    assert runs.run_status(damaged) == runs.FAILED
    resumed_again = _run(tmp_path, "more", checkpoint=3, finished=True)
    newer = resumed_again / "checkpoints" / "step-000005"  # resumed with more steps, then stopped
    newer.mkdir()
    (newer / "state.json").write_text("{}")
    write_manifest(newer)
    os.utime(newer / "manifest.json", (1e10, 1e10))
    assert runs.run_status(resumed_again) == runs.INTERRUPTED
    with run_lock(interrupted):  # this process holds the run: running, read without touching the lock
        assert lock_holder(interrupted)["pid"] == os.getpid()
        assert runs.run_status(interrupted) == runs.RUNNING
    assert lock_holder(interrupted) is None and runs.run_status(interrupted) == runs.INTERRUPTED


def test_a_lock_info_left_by_a_killed_process_is_not_running(tmp_path):
    run = _run(tmp_path, "killed", checkpoint=1)
    (run / ".tunelab.lock.json").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": os.uname().nodename,
                                                        "started": 1.0}))
    assert lock_holder(run) is None and runs.run_status(run) == runs.INTERRUPTED
    (run / ".tunelab.lock.json").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                        "started": 1.0}))  # a pid reused by a later process
    assert lock_holder(run) is None


def test_summary_row_has_task_model_method_steps_wall_time_and_best_metric(tmp_path):
    _run(tmp_path, "a", checkpoint=3, finished=True)
    _run(tmp_path, "b/nested", config={"task": "dpo", "model": {"name_or_path": "m"},
                                       "train": {"method": "full", "metric_for_best": "ppl"},
                                       "preference": {"loss": "ipo"}})
    (tmp_path / ".board").mkdir()
    (tmp_path / ".board" / "config.yaml").write_text("{}")
    found = runs.find_runs(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a", "b/nested"]
    a, b = (runs.summarize(p, tmp_path) for p in found)
    assert (a.task, a.base_model, a.method, a.status, a.steps, a.planned_steps) == ("sft", "tiny", "lora", "finished", 3, 3)
    assert a.wall_s == 12.5 and (a.best_metric, a.best, a.best_step) == ("loss", 1.25, 3)
    assert a.row()["wall_s"] == "0:00:12" and a.row()["best"] == "1.2500 @ 3" and a.row()["steps"] == "3/3"
    assert (b.method, b.best_metric, b.best, b.status, b.wall_s) == ("full (ipo)", "ppl", 3.49, "failed", 1.5)


def test_best_held_out_follows_the_metric_direction():
    records = [{"step": 1, "eval/loss": 2.0, "eval/accuracy": 0.5}, {"step": 2, "eval/loss": 1.0, "eval/accuracy": 0.4},
               {"step": 3, "eval/loss": 1.5, "eval/accuracy": 0.7}]
    assert runs.best_held_out(records, None) == ("loss", 1.0, 2)
    assert runs.best_held_out(records, "accuracy") == ("accuracy", 0.7, 3)
    assert runs.best_held_out([{"step": 1, "loss": 1.0}], None) == (None, None, None)


def test_paths_outside_the_runs_directory_are_refused(tmp_path):
    root = tmp_path / "runs"
    _run(root, "a")
    (tmp_path / "secret").mkdir()
    (root / "link").symlink_to(tmp_path / "secret")
    assert runs.inside(root, "a") == (root / "a").resolve()
    for bad in ("../secret", str(tmp_path / "secret"), "link", "a/../../secret", "/etc"):
        with pytest.raises(TunelabError, match="outside"):
            runs.inside(root, bad)


def test_the_follower_reads_only_new_lines_and_rereads_a_replaced_file(tmp_path):
    run = _run(tmp_path, "live", steps=2)
    follower = runs.MetricsFollower()
    assert [r.get("loss") for r in follower.records(run)] == [2.5, 2.0, None]
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.5}) + "\n" + '{"step": 4, "lo')  # step 4 half written
    assert [r["step"] for r in follower.records(run)] == [1, 2, 2, 3]
    tmp = run / "metrics.tmp"
    tmp.write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")  # --resume rewrites the file (atomic rename)
    os.replace(tmp, run / "metrics.jsonl")
    assert follower.records(run) == [{"step": 1, "loss": 9.0}]


def test_curves_config_diff_and_before_after_tables():
    frame = compare.curve_frame({"a": [{"step": 1, "loss": 2.0, "lr": 0.1}, {"step": 2, "loss": 1.0}],
                                 "b": [{"step": 1, "loss": 3.0}]}, ["loss"])
    assert frame[["run", "step", "value"]].values.tolist() == [["a", 1, 2.0], ["a", 2, 1.0], ["b", 1, 3.0]]
    assert compare.metric_names([{"step": 1, "zeta": 1, "loss": 2, "lr": 0.1}]) == ["loss", "lr", "zeta"]
    diff = compare.config_diff({"a": {"train": {"lr": 0.1, "seed": 0}, "model": "m"},
                                "b": {"train": {"lr": 0.2, "seed": 0}}})
    assert diff == [["model", "m", "<unset>"], ["train.lr", "0.1", "0.2"]]
    results = {"a": {"held_out_before": {"loss": 2.0}, "held_out_after": {"loss": 1.5},
                     "samples": [{"prompt": "hi", "before": "b0", "after": "a1"}]},
               "b": {"held_out_before": {"loss": 2.0}, "held_out_after": {"loss": 1.25},
                     "samples": [{"prompt": "hi", "before": "b0", "after": "b1"}]}}
    assert compare.held_out_table(results) == [["loss", "2.0000", "1.5000", "2.0000", "1.2500"]]
    assert compare.samples_table(results) == [["hi", "b0", "a1", "b1"]]


def test_launch_refuses_configs_and_run_names_outside_the_runs_directory(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    outside = tmp_path / "c.yaml"
    outside.write_text("model: {name_or_path: tiny}\ndata: {train: {path: x.jsonl}}\n")
    inside_config = root / "c.yaml"
    inside_config.write_text(outside.read_text())
    launcher = Launcher(root)
    with pytest.raises(TunelabError, match="outside"):
        launcher.start(str(outside), "x")
    with pytest.raises(TunelabError, match="outside"):
        launcher.start(str(inside_config), "../escape")
    with pytest.raises(TunelabError, match="output_dir"):
        launcher.start(str(inside_config), "x", "output_dir=/tmp/elsewhere")
    with pytest.raises(TunelabError, match="unknown key 'train.lrr'"):
        launcher.start(str(inside_config), "x", "train.lrr=1")
    assert launcher.launches == {} and not (root / "x").exists()


def test_watching_a_run_never_takes_its_lock_or_writes_into_it(tmp_path, monkeypatch):
    """Probing the flock would hold it for an instant and could refuse a ``train`` starting then: the board's
    readers must not touch it, nor write anything into a run."""
    import filelock

    run = _run(tmp_path, "watched", checkpoint=2, finished=True)
    before = sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*"))

    def refuse(*args, **kwargs):
        raise AssertionError("the board took a lock")

    monkeypatch.setattr(filelock.FileLock, "acquire", refuse)
    monkeypatch.setattr(filelock.UnixFileLock, "acquire", refuse, raising=False)
    runs.summarize(run, tmp_path)
    runs.MetricsFollower().records(run)
    compare.config_diff({"w": runs.read_config(run)})
    assert sorted((p.relative_to(run), p.stat().st_mtime_ns) for p in run.rglob("*")) == before


def test_tracker_folders_inside_a_run_are_not_runs(tmp_path):
    """MLflow copies config.yaml into mlruns/<exp>/<run>/artifacts/: that was listed as a 'failed' run."""
    run = _run(tmp_path, "a", checkpoint=3, finished=True)
    artifacts = run / "mlruns" / "1" / "abc" / "artifacts"
    artifacts.mkdir(parents=True)
    (artifacts / "config.yaml").write_text((run / "config.yaml").read_text())
    assert runs.find_runs(tmp_path) == [run]


@pytest.mark.parametrize("damage", ['{"step": "x", "loss": 1}\n', '{"step": null}\n', "[1, 2]\n", "tunelab.json=[]",
                                    "config.yaml=train: 5"])
def test_one_damaged_run_never_breaks_the_table(tmp_path, damage):
    """A bad record or a wrongly typed file in one run: that run gets a row, the others are listed as usual
    (before: int('x') raised and the whole board failed)."""
    good = _run(tmp_path, "good", checkpoint=3, finished=True)
    bad = _run(tmp_path, "bad", checkpoint=3, finished=True)
    if "=" in damage and not damage.startswith("{"):
        name, _, text = damage.partition("=")
        (bad / name).write_text(text)
    else:
        with (bad / "metrics.jsonl").open("a") as f:
            f.write(damage)
    rows = {p.name: runs.summarize(p, tmp_path) for p in runs.find_runs(tmp_path)}
    assert rows["good"].status == "finished" and rows["good"].steps == 3
    assert rows["bad"].name == "bad"
    rows["bad"].row()
    assert all(isinstance(r, dict) and isinstance(r.get("step", 0), int) for r in runs.MetricsFollower().records(bad))
