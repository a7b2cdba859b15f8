"""Issue 20, trackers: ``train.report_to`` sends every ``metrics.jsonl`` record to each named tracker with
the resolved config as hyperparameters, offline and under the run directory; a missing library is a
config error naming the extra. Each test reads the files the library wrote back with that library's
own reader. (Fails on the old code: ``train.report_to`` was an unknown key and nothing else was written.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tunelab.config.load import dump_config, validate_config
from tunelab.errors import ConfigError
from tunelab.training.metrics import MetricsLog, read_new_records
from tunelab.training.trackers import numeric_values

RECORDS = [
    {"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.7, "tokens_per_s": 100.0, "epoch": 0.1},
    {"step": 2, "loss": 2.25, "lr": 9e-4, "grad_norm": 0.5, "tokens_per_s": 110.0, "epoch": 0.2},
    {"step": 2, "eval/loss": 2.4, "eval/ppl": 11.02, "eval/per_class": {"a": {"f1": 0.5}}, "eval/names": ["x"]},
    {"step": 3, "loss": 2.0, "lr": 8e-4, "grad_norm": 0.4, "tokens_per_s": 120.0, "epoch": 0.3},
]


def _config(out: Path, report_to: list[str]):
    return validate_config({"output_dir": str(out), "model": {"name_or_path": "tiny"},
                            "data": {"train": {"path": "x.jsonl"}},
                            "train": {"lr": 1e-3, "max_steps": 3, "report_to": report_to}})


def _needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} not installed")


def _expected() -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for record in RECORDS:
        for key, value in numeric_values(record).items():
            series.setdefault(key, []).append((record["step"], value))
    return series


def _write(out: Path, report_to: list[str], records=RECORDS, resume_step=None) -> str:
    config_yaml = dump_config(_config(out, report_to))
    log = MetricsLog(out / "metrics.jsonl", resume_step=resume_step, report_to=report_to, config_yaml=config_yaml)
    for record in records:
        log.write(record)
    log.close()
    return config_yaml


def test_numeric_values_flattens_dicts_and_drops_text_lists_and_step():
    assert numeric_values(RECORDS[2]) == {"eval/loss": 2.4, "eval/ppl": 11.02, "eval/per_class/a/f1": 0.5}
    assert numeric_values({"step": 3, "ok": True, "nan": float("nan"), "n": 2}) == {"n": 2.0}


def test_a_missing_tracker_library_is_a_config_error_naming_the_extra(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, ["wandb"])
    assert "train.report_to" in str(err.value) and "pip install 'tunelab[wandb]'" in str(err.value)
    with pytest.raises(ConfigError, match="report_to"):
        _config(tmp_path, ["neptune"])
    assert _config(tmp_path, []).train.report_to == []  # default: no tracker


def test_the_metrics_file_reader_leaves_a_half_written_line_for_later(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    records, offset = read_new_records(path)
    assert records == [{"step": 1, "loss": 1.0}]
    with path.open("a") as f:
        f.write('ss": 0.5}\n')
    more, offset = read_new_records(path, offset)
    assert more == [{"step": 2, "loss": 0.5}] and offset == path.stat().st_size
    assert read_new_records(tmp_path / "missing.jsonl") == ([], 0)


@_needs("tensorboard")
def test_tensorboard_event_files_hold_every_metric_and_the_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config_yaml = _write(tmp_path, ["tensorboard"])
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    for key, points in _expected().items():
        assert [(e.step, pytest.approx(e.value)) for e in events.Scalars(key)] == points, key
    assert "config" in "".join(events.Tags()["tensors"])  # the config as text
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text.strip("`\n").removeprefix("yaml\n") == config_yaml.strip()
    hparams = events.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    assert b"train.lr" in hparams and b"model.name_or_path" in hparams


@_needs("tensorboard")
def test_tensorboard_after_resume_drops_the_points_past_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _write(tmp_path, ["tensorboard"], RECORDS)  # steps 1..3
    _write(tmp_path, ["tensorboard"], [{"step": 2, "loss": 9.0}, {"step": 3, "loss": 8.0}], resume_step=1)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 9.0), (3, 8.0)]


@_needs("mlflow")
def test_mlflow_file_store_holds_every_metric_and_the_config_as_params(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    config_yaml = _write(tmp_path, ["mlflow"])
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())  # the file store under the run
    [run] = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    for key, points in _expected().items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == points, key
    assert run.data.params["train.lr"] == "0.001" and run.data.params["model.name_or_path"] == "tiny"
    assert run.data.params["train.report_to"] == "[mlflow]"
    assert Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text() == config_yaml


@_needs("mlflow")
def test_mlflow_after_kill_and_resume_holds_each_step_once(tmp_path, monkeypatch):
    # kill -9 after step 3 reached MLflow, checkpoint at step 1: the resumed run recomputes steps 2-3.
    # MLflow cannot delete points, so it used to hold steps 2 and 3 twice (breaker, issue 20).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    _write(tmp_path, ["mlflow"], RECORDS)
    _write(tmp_path, ["mlflow"], [r for r in RECORDS if r["step"] > 1] + [{"step": 4, "loss": 1.5}], resume_step=1)
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")) == [2]


@_needs("mlflow")
def test_an_unreachable_mlflow_server_is_a_config_error_in_seconds(monkeypatch):
    # It used to hang for minutes in MLflow's retries, without a message (breaker, issue 20).
    import socket
    import time

    from tunelab.training.trackers import check_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=rf"train.report_to: mlflow: the server MLFLOW_TRACKING_URI=http://127.0.0.1:{port}"):
        check_reachable(["tensorboard", "mlflow"])
    assert time.monotonic() - started < 60
    check_reachable(["tensorboard"])  # no MLflow asked for: nothing checked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///tmp/x")
    check_reachable(["mlflow"])  # a file store needs no server


@_needs("wandb")
def test_wandb_offline_run_file_holds_every_metric_and_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    _write(tmp_path, ["wandb"])
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = _read_wandb(run_file)
    for key, points in _expected().items():
        got = [(row["_step"], row[key]) for row in history if key in row]
        assert got == [(s, pytest.approx(v)) for s, v in points], key
    assert config["train"]["lr"] == 0.001 and config["model"]["name_or_path"] == "tiny"


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` transaction log: a 7-byte header (``:W&B``, magic, version) and then
    LevelDB log blocks of 32 KiB, each record a 7-byte header (crc32c, uint16 length, type: 1 full,
    2 first, 3 middle, 4 last). wandb >= 0.2x reads it in its Go core only, so it is read here."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left  # zero padding at the end of a block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pending)
    return records


def _read_wandb(path: Path) -> tuple[list[dict], dict]:
    """History rows and config of an offline ``.wandb`` file, parsed with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    history, config = [], {}
    for data in _wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind in ("config", "run"):
            items = record.config.update if kind == "config" else record.run.config.update
            config.update({item.key: json.loads(item.value_json) for item in items})
    config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}
    return history, config


@_needs("trackio")
def test_trackio_local_database_holds_every_metric_and_the_config(tmp_path, monkeypatch):
    import sqlite3

    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio-store"))  # trackio's own store, kept out of ~/.cache
    import trackio.sqlite_storage  # (it reads TRACKIO_DIR once, at import)

    monkeypatch.setattr(trackio.sqlite_storage, "TRACKIO_DIR", tmp_path / "trackio-store")
    _write(tmp_path, ["trackio"])
    [db] = (tmp_path / "trackio-store").glob("*.db")
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT step, metrics FROM metrics WHERE run_name = ? ORDER BY id", (tmp_path.name,)).fetchall()
        configs = [json.loads(c) for (c,) in conn.execute("SELECT config FROM configs WHERE run_name = ?",
                                                            (tmp_path.name,))]
    for key, points in _expected().items():
        got = [(step, json.loads(m)[key]) for step, m in rows if key in json.loads(m)]
        assert got == [(s, pytest.approx(v)) for s, v in points], key
    assert configs and configs[-1]["train.lr"] == 0.001


@_needs("tensorboard")
def test_every_step_of_a_training_run_and_an_rl_run_reaches_the_tracker(tmp_path):
    """Through the loop itself (fit, used by sft/classification/reward/dpo) and the RL checkpoint helper
    (ppo/grpo): the tracker gets what metrics.jsonl got, step by step."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.faults.tiny import train_tiny
    from tunelab.rollout.checkpoints import RLCheckpoints

    losses, _ = train_tiny(tmp_path / "sft", report_to=["tensorboard"])
    events = EventAccumulator(str(tmp_path / "sft" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(losses)
    assert [e.step for e in events.Scalars("loss")] == list(range(1, len(losses) + 1))

    config = _config(tmp_path / "rl", ["tensorboard"])
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    checkpoints = RLCheckpoints(tmp_path / "rl", layer, optimizer, scheduler, config.train, dump_config(config),
                                lambda: {}, lambda extra: None)
    first, log = checkpoints.start(None, 2)
    for step in (1, 2):
        log.write({"step": step, "reward/mean": 0.25 * step, "kl": 0.01})
    log.close()
    events = EventAccumulator(str(tmp_path / "rl" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(1, 0.25), (2, 0.5)]


def test_jsonl_records_with_unicode_line_separators_survive_reading_and_a_resume_trim(tmp_path):
    # samples.jsonl is written with ensure_ascii=False; str.splitlines() also splits at U+2028/U+2029/U+0085,
    # which JSON leaves unescaped, so a resume (and bench readers of `tunelab predict` output on PubMedQA
    # abstracts) failed with "Unterminated string".
    path = tmp_path / "samples.jsonl"
    lines = [{"step": 1, "text": "a\u2028b"}, {"step": 2, "text": "c\u2029d\x85e"}, {"step": 3, "text": "f"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    log = MetricsLog(path, resume_step=2)
    log.close()
    assert [json.loads(line) for line in path.read_text().split("\n") if line] == lines[:2]
    assert log.read() == lines[:2]
