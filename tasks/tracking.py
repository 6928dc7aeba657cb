"""MLflow plumbing for the stage tasks: tracking URI, nested runs, step metrics, model registry."""

from __future__ import annotations

import json
import os
import re
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
    # log_model's env-var recording patches os.environ's class for the whole process and iterates
    # the names it saw: a stage thread reading the environment meanwhile fails the registration
    # with "Set changed size during iteration" (seen on a served run: export beside report)
    os.environ.setdefault("MLFLOW_RECORD_ENV_VARS_IN_MODEL_LOGGING", "false")
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

    def __init__(self, run_id: str, flush_every: int = 50, flush_seconds: float = 5.0):
        import time

        self.run_id = run_id
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds  # the MLflow UI's charts move while a stage trains
        self.client = MlflowClient()
        self.pending: list = []
        self.flushed_at = time.monotonic()

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for name, value in metrics.items():
            if name != "step":
                self.pending.append(Metric(metric_name(name), float(value), now, step))
        if len(self.pending) >= self.flush_every * max(1, len(metrics)) or time.monotonic() - self.flushed_at >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        import time

        for start in range(0, len(self.pending), 900):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=self.pending[start : start + 900])
        self.pending = []
        self.flushed_at = time.monotonic()


_LAYER_TERM = re.compile(r"^loss/(\w+)\[(-?\d+)<-(-?\d+)\]:(\w+)$")  # loss/<feature>[<s><-<t>]:<loss>
_OUTPUT_TERM = re.compile(r"^loss/(\w+):(\w+)$")  # loss/<feature>:<loss>


def metric_name(name: str) -> str:
    """The MLflow name of a trainer metric. A loss term ``attention_scores[1<-2]:attention_mse``
    becomes ``loss/attention_scores/s1_t2/attention_mse`` (student layer 1 against teacher layer
    2): MLflow allows none of ``[<]``, and its charts group metrics by their ``/`` prefixes."""
    if match := _LAYER_TERM.match(name):
        feature, student, teacher, loss = match.groups()
        return f"loss/{feature}/s{student}_t{teacher}/{loss}"
    if match := _OUTPUT_TERM.match(name):
        return f"loss/{match.group(1)}/{match.group(2)}"
    # anything else: MLflow allows alphanumerics, _ - . space : / only
    return "".join(ch if ch.isalnum() or ch in "_-. :/" else "_" for ch in name)


PYFUNC_MODEL = Path(__file__).with_name("pyfunc_model.py")
EXAMPLE_TEXTS = ("a gripping, funny and beautifully acted film", "dull, predictable and far too long")


def _pip_requirements() -> list[str]:
    # stated, not inferred: inference loads the model in a subprocess, seconds per version
    import pandas
    import torch
    import transformers

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}", f"pandas=={pandas.__version__}"]


def log_markdown(client: MlflowClient, run_id: str, path: Path) -> None:
    """``path`` and, beside it, ``<stem>.html`` with its tables and images rendered: the MLflow
    artifact viewer shows markdown as text, HTML as a page."""
    import tempfile

    from kd_core.report import markdown_html

    client.log_artifact(run_id, str(path))
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / f"{path.stem}.html"
        page.write_text(markdown_html(path))
        client.log_artifact(run_id, str(page))


def existing_version(client: MlflowClient, name: str, key: str):
    """The version of ``name`` registered for stage key ``key``, if any."""
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`kd.key` = '{key}'")
    except mlflow.exceptions.MlflowException:
        return None
    return found[0] if found else None


def register_model_dir(run_id: str, model_dir: Path, name: str, tags: dict[str, str], pair_task: bool = False,
                       description: str = "") -> tuple[str, bool]:
    """Log a save_pretrained dir as an MLflow pyfunc model (tokenizer + weights, with a signature
    and an input example) under the run and register it as a version of ``name``, tagged with
    ``tags`` (``kd.key`` among them). A key that already has a version is not registered again.
    Returns (version, newly registered)."""
    import pandas as pd

    client = MlflowClient()
    found = existing_version(client, name, tags["kd.key"])
    if found is not None:
        return found.version, False
    example = pd.DataFrame({"text_a": list(EXAMPLE_TEXTS)})
    if pair_task:
        example["text_b"] = list(reversed(EXAMPLE_TEXTS))
    import warnings

    # log_model needs the fluent API's active run; one thread at a time resumes a run through it
    with _setup_lock, mlflow.start_run(run_id=run_id, nested=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")  # label_id
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_MODEL), artifacts={"model_dir": str(model_dir)},
            input_example=example, pip_requirements=_pip_requirements(), registered_model_name=name,
            await_registration_for=0,
        )
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if description:
        client.update_model_version(name, version, description=description)
    return version, True


def register_onnx(run_id: str, form_dir: Path, name: str, tags: dict[str, str], description: str = "") -> tuple[str, bool]:
    """Log ``form_dir/model.onnx`` with MLflow's onnx flavour (the tokenizer and config.json as
    extra files, a signature from an input example of token ids) under the run, and register it
    as a version of ``name``. A key that already has a version is not registered again.
    Returns (version, newly registered)."""
    import numpy as np
    import onnx
    import onnxruntime

    client = MlflowClient()
    found = existing_version(client, name, tags["kd.key"])
    if found is not None:
        return found.version, False
    graph = onnx.load(str(form_dir / "model.onnx"))
    inputs = [i.name for i in graph.graph.input]
    # the graph takes token ids: two tokenised rows as the example (CLS, a token, SEP)
    example = {n: np.array([[101, 2000, 102], [101, 2001, 102]] if n == "input_ids" else np.ones((2, 3)) if n == "attention_mask"
                           else np.zeros((2, 3)), dtype=np.int64) for n in inputs}
    extra = [str(p) for p in sorted(form_dir.iterdir()) if p.name != "model.onnx" and p.is_file()]
    with _setup_lock, mlflow.start_run(run_id=run_id, nested=True):
        info = mlflow.onnx.log_model(
            graph, name=f"model-{form_dir.name}", input_example=example, extra_files=extra,
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"onnx=={onnx.__version__}",
                              f"onnxruntime=={onnxruntime.__version__}"],
            onnx_execution_providers=["CPUExecutionProvider"], registered_model_name=name,
            await_registration_for=0, save_as_external_data=False,
        )
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if description:
        client.update_model_version(name, version, description=description)
    return version, True


def annotate_versions(report_manifest: dict, summary, eval_split: str) -> list[str]:
    """After a report: tag the registered versions of its models with their score, retention,
    params and speed-up, and point the alias ``best`` (``best-<split>`` off dev) at the
    highest-scoring version of each registered student on that split."""
    client = MlflowClient()
    done = []
    evaluated = next(iter(report_manifest["inputs"].values()))  # the evaluation stage comes first
    refs = json.loads((Path(evaluated["path"]) / "manifest.json").read_text())["inputs"]
    if not (summary["split"] == eval_split).any() and len(summary):
        eval_split = str(summary["split"].iloc[0])  # QA reports name their split (dev-articles-eval)
    rows = {row.model: row for row in summary.itertuples() if row.split == eval_split}
    for ref in refs.values():
        for version in client.search_model_versions(f"tags.`kd.key` = '{ref['key']}'"):
            role = version.tags.get("kd.role")
            row = rows.get(role)
            if row is None:
                continue
            numbers = {"kd.score": f"{row.score:.2f}", "kd.retention": f"{row.retention:.1f}",
                       "kd.params_m": f"{row.params / 1e6:.2f}", "kd.speed_up": f"{row.speedup:.2f}",
                       "kd.split": eval_split}
            for key, value in numbers.items():
                client.set_model_version_tag(version.name, version.version, key, value)
            if role == "student":
                alias = "best" if eval_split == "dev" else f"best-{eval_split}"
                scored = [v for v in client.search_model_versions(f"name = '{version.name}'")
                          if v.tags.get("kd.split") == eval_split and "kd.score" in v.tags]
                best = max(scored, key=lambda v: float(v.tags["kd.score"]))
                client.set_registered_model_alias(version.name, alias, best.version)
            done.append(f"{version.name}/{version.version}")
    return done
