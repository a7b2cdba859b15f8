"""Experiment trackers (``train.report_to``): TensorBoard, Weights & Biases, MLflow, Trackio.

Every record :class:`tunelab.training.metrics.MetricsLog` appends to ``metrics.jsonl`` also goes
to each tracker named in ``train.report_to``, through that library's own API, with the run's
resolved config as its hyperparameters. Each library is imported here and only here, lazily (when a
run opens its tracker), so none of them is a dependency of tunelab; the pip extra that installs
each one is :data:`TRACKERS`. Everything works offline; all but Trackio (one local database for all runs, by its design) write
under the run directory:

=============  ==========================================  ===========================================
report_to      where it writes (under ``output_dir``)      how it is read
=============  ==========================================  ===========================================
tensorboard    ``tensorboard/events.out.tfevents.*``       ``tensorboard --logdir runs/``
wandb          ``wandb/offline-run-*/run-*.wandb``          ``wandb sync runs/x/wandb/offline-run-*``
               (offline unless ``WANDB_MODE`` says else)
mlflow         ``mlruns/`` (MLflow file store, unless           ``mlflow ui --backend-store-uri runs/x/mlruns``
               ``MLFLOW_TRACKING_URI`` names another)
trackio        trackio's own local store, project          ``trackio show --project tunelab``
               ``tunelab``, run = the run directory's name
               (``$TRACKIO_DIR``, default
               ``~/.cache/huggingface/trackio``)
=============  ==========================================  ===========================================

Only numbers are tracked: a record's nested dicts become ``a/b`` keys; lists and text (a confusion
matrix, sample answers) stay in ``metrics.jsonl`` only. The x axis is the record's ``step``
(optimizer step; RL step for PPO/GRPO). A resumed run continues the same tracker run where the
library allows it (MLflow: the same run, points past the checkpoint that reached it before the
interruption are not logged again; TensorBoard: a purge event drops points past the resumed
step); a fresh run (or ``--overwrite``) first removes the tracker directory an earlier run left
(Trackio: a resumed run continues the run of that name, ``resume="allow"``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import yaml

from tunelab.errors import ConfigError

# report_to name -> (module imported, pip extra of tunelab that installs it)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
TRACKER_DIRS: dict[str, str] = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlruns"}
PROJECT = "tunelab"


class Tracker(Protocol):
    """One open tracker run: ``log`` one record of numbers at ``step``, ``close`` once at the end."""

    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def check_installed(names: Iterable[str]) -> None:
    """Refuse ``train.report_to`` entries whose library is not importable (without importing it).

    Raises:
        ConfigError: naming each missing library and the ``pip install 'tunelab[EXTRA]'`` that adds it.
    """
    missing = [name for name in names if importlib.util.find_spec(TRACKERS[name][0]) is None]
    if missing:
        extras = ",".join(TRACKERS[name][1] for name in missing)
        raise ConfigError(f"train.report_to: {', '.join(missing)} is not installed; install it with "
                          f"pip install 'tunelab[{extras}]' (or remove it from train.report_to)")


def numeric_values(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics record, nested dicts flattened to ``a/b`` keys; ``step``, bools, lists,
    text and non-finite values dropped."""
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numeric_values(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step" \
                and value == value and abs(value) != float("inf"):
            out[name] = float(value)
    return out


def flat_config(config_yaml: str) -> dict[str, Any]:
    """The resolved config as ``{"train.lr": 0.0002, ...}``; lists and nulls as their YAML text."""
    def walk(node: Any, prefix: str) -> dict[str, Any]:
        if isinstance(node, dict) and node:
            flat: dict[str, Any] = {}
            for key, value in node.items():
                flat.update(walk(value, f"{prefix}{key}."))
            return flat
        value = node if isinstance(node, (int, float, str, bool)) else yaml.safe_dump(node, default_flow_style=True).strip()
        return {prefix[:-1]: value}

    raw = yaml.safe_load(config_yaml) or {}
    return walk(raw, "") if isinstance(raw, dict) else {}


def mlflow_server_uri() -> str | None:
    """``$MLFLOW_TRACKING_URI`` when it names a server (http/https/databricks), else None (the file store)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri if uri.split(":", 1)[0] in ("http", "https", "databricks") else None


def check_reachable(names: Iterable[str]) -> None:
    """Before any data or weights load: an MLflow server named by ``$MLFLOW_TRACKING_URI`` answers.

    MLflow's client retries an unreachable server with back-off for minutes, silently; tunelab lowers
    that to 2 retries of 10 s (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``_TIMEOUT``, unless set) and asks
    once here, so a wrong URI fails in seconds, before ``--overwrite`` replaces anything.

    Raises:
        ConfigError: the server does not answer (naming the URI and ``train.report_to``).
    """
    uri = mlflow_server_uri() if "mlflow" in names else None
    if uri is None:
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # requests/MLflow raise many types for a refused or timed-out connection
        raise ConfigError(f"train.report_to: mlflow: the server MLFLOW_TRACKING_URI={uri} does not answer "
                          f"({type(err).__name__}: {str(err)[:200]}); start it, fix the variable, or unset it "
                          "to write the file store under the run directory") from None


def remove_tracker_dirs(run_dir: Path) -> None:
    """Remove the tracker directories (:data:`TRACKER_DIRS`) an earlier run left in ``run_dir``.

    Called when a fresh run replaces an old one (``--overwrite``), whatever this run's
    ``train.report_to``: a run that no longer reports to MLflow must not show the old run's curves
    (in ``mlruns/``, or on the board) as its own. Only these tunelab-written names are removed.
    """
    for sub in TRACKER_DIRS.values():
        if (run_dir / sub).is_dir():
            shutil.rmtree(run_dir / sub)


def open_trackers(names: Iterable[str], run_dir: Path, config_yaml: str, resume_step: int | None) -> list[Tracker]:
    """Open one tracker run per name, writing under ``run_dir``; ``resume_step`` None = a fresh run.

    Raises:
        ConfigError: a library is missing (:func:`check_installed`).
    """
    names = list(dict.fromkeys(names))
    check_installed(names)
    opened: list[Tracker] = []
    for name in names:
        directory = run_dir / TRACKER_DIRS.get(name, "")
        if name in TRACKER_DIRS:
            if resume_step is None and directory.exists():
                shutil.rmtree(directory)  # an earlier run's tracker files (--overwrite)
            directory.mkdir(parents=True, exist_ok=True)
        opened.append(_OPENERS[name](directory, run_dir.name, config_yaml, resume_step))
    return opened


class _TensorBoard:
    def __init__(self, directory: Path, name: str, config_yaml: str, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(directory),
                                    purge_step=resume_step + 1 if resume_step is not None else None)
        if resume_step is None:
            params = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                      for k, v in flat_config(config_yaml).items()}
            for summary in hparams(params, {}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```yaml\n" + config_yaml + "```", 0)
        self.writer.flush()

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a running job's curves are on disk at every step

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, directory: Path, name: str, config_yaml: str, resume_step: int | None):
        import wandb

        self.run = wandb.init(
            project=PROJECT, name=name, dir=str(directory.parent), config=yaml.safe_load(config_yaml),  # -> wandb/
            mode=os.environ.get("WANDB_MODE", "offline"), reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # stops wandb's service process, which writes the offline run file out before it exits


class _MLflow:
    def __init__(self, directory: Path, name: str, config_yaml: str, resume_step: int | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if mlflow_server_uri():
            check_reachable(["mlflow"])  # also sets the short retry/timeout defaults for the whole run
        if not uri:  # the file store: in maintenance mode since MLflow 3, still supported behind this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = directory.resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(PROJECT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(PROJECT)
        earlier = self.client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=1) \
            if resume_step is not None else []
        self.logged: set[tuple[str, int]] = set()
        if earlier:  # --resume: continue the interrupted run
            self.run_id = earlier[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            # Points logged after the checkpoint, before the interruption: MLflow cannot delete them,
            # so they are not logged twice (an exact resume recomputes the same values).
            for key in earlier[0].data.metrics:
                self.logged.update((key, m.step) for m in self.client.get_metric_history(self.run_id, key)
                                   if m.step > resume_step)
            return
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        params = [Param(k[:250], str(v)[:6000]) for k, v in flat_config(config_yaml).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, config_yaml, "config.yaml")

    def log(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items() if (k, step) not in self.logged]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Trackio:
    def __init__(self, directory: Path, name: str, config_yaml: str, resume_step: int | None):
        import trackio

        self.run = trackio.init(project=PROJECT, name=name, config=flat_config(config_yaml),
                                resume="allow" if resume_step is not None else "never")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


_OPENERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow, "trackio": _Trackio}
