"""MLflow plumbing for the stage tasks: tracking URI, nested runs, step metrics, model registry."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from kd_core.models.registry import kd_home

EXPERIMENT = "kd-pipeline"
_setup_lock = threading.Lock()


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{kd_home() / 'mlflow.db'}"


def setup_tracking() -> str:
    """Point MLflow at the store and return the experiment id (artifacts under $KD_HOME)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # threads of one run share _setup_lock; two runs creating one sqlite store at once raced
    # in MLflow's schema migration ("No such index ..."), so processes take a file lock too
    with _setup_lock, _store_lock():
        mlflow.set_tracking_uri(tracking_uri())
        client = MlflowClient()
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            location = None
            if tracking_uri().startswith("sqlite:"):
                location = (kd_home() / "mlartifacts").resolve().as_uri()
            return client.create_experiment(EXPERIMENT, artifact_location=location)
        return experiment.experiment_id


def _store_lock():
    from contextlib import nullcontext

    from filelock import FileLock

    if not tracking_uri().startswith("sqlite:"):
        return nullcontext()
    path = kd_home() / ".locks" / "mlflow-store.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def flatten(prefix: str, value: Any, out: dict[str, str] | None = None) -> dict[str, str]:
    out = {} if out is None else out
    if isinstance(value, dict):
        for key, item in value.items():
            flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = str(value)[:500]  # MLflow caps param values
    return out


class StepMetricsLogger:
    """Trainer callback: every loss term per step, sent to MLflow in batches."""

    def __init__(self, run_id: str, flush_every: int = 50):
        self.run_id = run_id
        self.flush_every = flush_every
        self.client = MlflowClient()
        self.pending: list = []

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        import time

        now = int(time.time() * 1000)
        for name, value in metrics.items():
            if name != "step":
                self.pending.append(Metric(_metric_name(name), float(value), now, step))
        if len(self.pending) >= self.flush_every * max(1, len(metrics)):
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self.pending), 900):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=self.pending[start : start + 900])
        self.pending = []


def _metric_name(name: str) -> str:
    # MLflow allows alphanumerics, _ - . space : / only
    return "".join(ch if ch.isalnum() or ch in "_-. :/" else "_" for ch in name)


def register_model_dir(run_id: str, model_dir: Path, name: str) -> str:
    """Log a save_pretrained dir under the run and register it; returns the version."""
    client = MlflowClient()
    client.log_artifacts(run_id, str(model_dir), artifact_path="model")
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    version = client.create_model_version(name, source=source, run_id=run_id)
    return version.version
