"""The one place a stage meets Prefect and MLflow: cache lookup, nested run, artifact write."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from filelock import Timeout
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed

from kd_core.artifacts import Artifact, ArtifactStore
from kd_core.config import PipelineConfig
from kd_core.stages.common import StageIO
from kd_core.stop import STOP_REQUESTED, StopRequested, TrainingInterrupted, check_stop, stoppable
from tasks.stages import dag_for, stage_matches
from tasks.tracking import (
    StepMetricsLogger,
    annotate_versions,
    existing_version,
    flatten,
    log_markdown,
    register_model_dir,
    register_onnx,
    setup_tracking,
)

SMALL_OUTPUTS = (".json", ".md", ".png", ".parquet")

# Concurrent branches still overlap data work, but training stages share the device: two
# trainings on 2 CPU cores each start their own thread team and both run at half speed or worse.
# KD_TRAINING_SLOTS raises the limit (say, one per GPU of a multi-GPU worker).
_TRAINING_SLOTS = threading.BoundedSemaphore(max(1, int(os.environ.get("KD_TRAINING_SLOTS", "1"))))


class StageFailed(RuntimeError):
    """A stage raised ``cause``: what the flow run ends with, instead of Prefect's UnfinishedRun
    of a downstream stage that never started."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage {stage} failed: {cause}")
        self.stage = stage
        self.cause = cause


# The first failure of each flow run (by parent run id), recorded from the task thread that
# raised it; the flow body's ``with pipeline_run(...)`` re-raises it as StageFailed.
_FAILURES: dict[str, tuple[str, BaseException]] = {}
_FAILURES_LOCK = threading.Lock()


def first_failure(parent_run_id: str | None) -> tuple[str, BaseException] | None:
    with _FAILURES_LOCK:
        return _FAILURES.pop(parent_run_id, None) if parent_run_id else None


def _record_failure(ctx: "RunContext", name: str, exc: BaseException) -> None:
    """Keep the first failure; a stage that checkpointed on a stop replaces one that had only
    been stopped before it started (its message says where the rerun resumes)."""
    if ctx.parent_run_id:
        with _FAILURES_LOCK:
            first = _FAILURES.get(ctx.parent_run_id)
            replaces = first is not None and isinstance(exc, TrainingInterrupted) and not isinstance(first[1], TrainingInterrupted)
            if first is None or replaces:
                _FAILURES[ctx.parent_run_id] = (name, exc)


class StageProgress:
    """Trainer callback: progress where the user looks. A console/flow-run log line every
    ``every_s`` seconds (step/total, loss, seq/s, ETA), and a Prefect progress artifact on the
    task run, updated at most every ``artifact_s`` seconds. Stages that do not train report
    ``on_progress(done, total, unit)`` (augmented rows, corpus blocks) the same way."""

    def __init__(self, stage: str, logger, every_s: float = 15.0, artifact_s: float = 3.0):
        import time

        self.stage, self.logger, self.every_s, self.artifact_s = stage, logger, every_s, artifact_s
        self.artifact_id = None
        self.created = time.monotonic()  # a rate needs the stage's start, not its first report

    def on_train_begin(self, first_step: int, last_step: int, global_batch: int) -> None:
        import time

        from prefect.artifacts import create_progress_artifact

        self.first, self.last, self.global_batch = first_step, last_step, global_batch
        self.started = self.logged_at = self.updated_at = time.monotonic()
        resumed = f", resumed at step {first_step}" if first_step else ""
        self.logger.info("%s: training %d steps%s", self.stage, last_step - first_step, resumed)
        try:
            self.artifact_id = create_progress_artifact(
                100.0 * first_step / max(1, last_step), description=f"{self.stage}: step {first_step}/{last_step}")
        except Exception as exc:  # noqa: BLE001 - progress must never fail a training stage
            self.logger.debug("%s: no progress artifact (%s)", self.stage, exc)

    def on_progress(self, done: int, total: int, unit: str) -> None:
        import time

        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        now = time.monotonic()
        if not hasattr(self, "started"):
            self.started, self.logged_at, self.updated_at = self.created, now, now
            try:
                self.artifact_id = create_progress_artifact(0.0, description=f"{self.stage}: 0/{total} {unit}")
            except Exception as exc:  # noqa: BLE001 - progress must never fail a stage
                self.logger.debug("%s: no progress artifact (%s)", self.stage, exc)
        rate = done / max(now - self.started, 1e-9)
        amount = (f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB  {rate / 2**20:.2f} MiB/s" if unit == "bytes"
                  else f"{done}/{total} {unit}  {rate:.1f} {unit}/s")
        line = f"{amount}  ETA {_duration((total - done) / max(rate, 1e-9))}"
        if now - self.logged_at >= self.every_s or done >= total:
            self.logger.info("%s: %s", self.stage, line)
            self.logged_at = now
        if self.artifact_id is not None and (now - self.updated_at >= self.artifact_s or done >= total):
            try:
                update_progress_artifact(self.artifact_id, min(100.0, 100.0 * done / max(1, total)),
                                         description=f"{self.stage}: {line}")
            except Exception as exc:  # noqa: BLE001
                self.logger.debug("%s: progress update failed (%s)", self.stage, exc)
            self.updated_at = now

    def on_step_end(self, step: int, metrics: dict[str, float]) -> None:
        import time

        if not hasattr(self, "first"):
            return
        now = time.monotonic()
        done = step - self.first
        rate = done / max(now - self.started, 1e-9)
        line = (f"step {step}/{self.last}  loss {metrics['loss']:.4f}  {rate * self.global_batch:.1f} seq/s  "
                f"ETA {_duration((self.last - step) / max(rate, 1e-9))}")
        if now - self.logged_at >= self.every_s or step == self.last:
            self.logger.info("%s: %s", self.stage, line)
            self.logged_at = now
        if self.artifact_id is not None and (now - self.updated_at >= self.artifact_s or step == self.last):
            from prefect.artifacts import update_progress_artifact

            try:
                update_progress_artifact(self.artifact_id, 100.0 * step / max(1, self.last), description=f"{self.stage}: {line}")
            except Exception as exc:  # noqa: BLE001
                self.logger.debug("%s: progress update failed (%s)", self.stage, exc)
            self.updated_at = now


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def process_tags() -> dict[str, str]:
    """Which process owns a RUNNING MLflow run: a later run marks it KILLED once that process is gone."""
    return {"kd.host": socket.gethostname(), "kd.pid": str(os.getpid())}


def close_abandoned_runs(client: MlflowClient, experiment_id: str) -> int:
    """RUNNING runs of this host whose process no longer exists (a kill -9, a power cut) become
    KILLED, so the MLflow UI does not show them running for good."""
    import psutil

    stale = client.search_runs(
        [experiment_id], f"attributes.status = 'RUNNING' and tags.`kd.host` = '{socket.gethostname()}'", max_results=1000)
    closed = 0
    for run in stale:
        pid = int(run.data.tags.get("kd.pid", "0") or 0)
        if pid and not psutil.pid_exists(pid):
            client.set_terminated(run.info.run_id, "KILLED")
            closed += 1
    return closed


@dataclass(frozen=True)
class RunContext:
    """What every stage of one flow run shares. Passed explicitly: MLflow's active run is per thread."""

    kd_home: str
    flow_name: str
    parent_run_id: str | None = None
    flow_run_id: str | None = None
    force: tuple[str, ...] = field(default_factory=tuple)

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(Path(self.kd_home) / "artifacts")


def _is_pair_task(task: str) -> bool:
    from kd_core.data.tasks import UnknownTaskError, get_task

    try:
        return get_task(task).is_pair
    except UnknownTaskError:
        return False


def stage_processes() -> int:
    """Processes per training stage (KD_STAGE_PROCESSES, e.g. the worker's GPU count)."""
    return max(1, int(os.environ.get("KD_STAGE_PROCESSES", "1")))


def stage_section(stage, cfg: PipelineConfig) -> dict:
    section = stage.section(cfg)
    if stage.trains and stage_processes() > 1:
        # DDP multiplies the global batch by the process count: a different result, a different key
        section = {**section, "processes": stage_processes()}
    return section


def stage_key(ctx: RunContext, cfg: PipelineConfig, name: str, inputs: dict[str, Artifact]) -> str:
    """The stage's cache key: its config section, its inputs' digests by role, and the hash of the
    kd_core code its function can run."""
    stage = dag_for(ctx.flow_name, cfg)[name]
    return ctx.store.stage_key(name, stage_section(stage, cfg), inputs, code=stage.code)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_distributed(ctx: RunContext, cfg: PipelineConfig, name: str, inputs, out: Path, work: Path, run_id: str) -> dict:
    """Run a training stage under torchrun with stage_processes() ranks; return rank 0's result."""
    work.mkdir(parents=True, exist_ok=True)
    spec = {
        "flow": ctx.flow_name,
        "stage": name,
        "config": cfg.model_dump(mode="json"),
        "inputs": {role: str(a.path) for role, a in inputs.items()},
        "out": str(out),
        "work": str(work),
        "result": str(work / "launch-result.json"),
        "mlflow_run_id": run_id,
    }
    spec_path = work / "launch-spec.json"
    spec_path.write_text(json.dumps(spec))
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={stage_processes()}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "tasks.launch", str(spec_path),
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"stage {name} failed under torchrun (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(Path(spec["result"]).read_text())


def run_stage(ctx: RunContext, cfg: PipelineConfig, name: str, inputs: dict[str, Artifact]):
    """Return the cached artifact (as a 'Cached' state) or compute, track and store it.
    ``inputs``: the upstream artifacts by the roles the stage's graph entry names."""
    stage = dag_for(ctx.flow_name, cfg)[name]
    logger = get_run_logger()
    if set(inputs) != set(stage.inputs):
        raise ValueError(f"stage {name} reads {sorted(stage.inputs)}; it was given {sorted(inputs)}")
    section = stage_section(stage, cfg)
    store = ctx.store
    key = store.stage_key(name, section, inputs, code=stage.code)
    forced = stage_matches(list(ctx.force), name)

    def cached():
        artifact, problem = store.lookup(name, key)
        if problem:
            logger.warning("%s: recomputing, %s", name, problem)
        if artifact is not None:
            logger.info("%s: cached %s", name, artifact.path)
            if stage.register_as or stage.registers_onnx:
                register_outputs(ctx, cfg, stage, name, key, artifact, logger, run_id=None)
            return Completed(data=artifact, name="Cached", message=f"{name} cached at {artifact.path}")
        return None

    if not forced and (hit := cached()) is not None:
        return hit
    lock = store.lock(name, key)
    waited = False
    while True:
        try:
            lock.acquire(timeout=1)
            break
        except Timeout:
            if STOP_REQUESTED.is_set():
                raise StopRequested(f"stopped on request while waiting for another run's {name}") from None
            if not waited:
                logger.info("%s: another run is computing this key; waiting for it", name)
                waited = True
    try:
        # the run that held the lock may have just written it
        if not forced and (hit := cached()) is not None:
            return hit
        check_stop(f"stage {name}")  # a stop asked while it queued: it does not start
        with stoppable():
            return _compute_stage(ctx, cfg, stage, name, key, section, inputs, logger)
    finally:
        lock.release()


def _compute_stage(ctx: RunContext, cfg: PipelineConfig, stage, name: str, key: str, section: dict,
                   inputs: dict[str, Artifact], logger):
    store = ctx.store
    experiment_id = setup_tracking()
    client = MlflowClient()
    tags = {"kd.stage": name, "kd.key": key, "kd.flow": ctx.flow_name, "kd.profile": cfg.profile, **process_tags()}
    if ctx.parent_run_id:
        tags["mlflow.parentRunId"] = ctx.parent_run_id
    if ctx.flow_run_id:
        tags["prefect.flow_run_id"] = ctx.flow_run_id
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    try:
        params = [Param(k, v) for k, v in flatten("", section).items()]
        for start in range(0, len(params), 100):
            client.log_batch(run_id, params=params[start : start + 100])
        step_logger = StepMetricsLogger(run_id)
        work = store.work_dir(name, key)
        if stage.trains and stage_processes() > 1:
            produce = lambda out: launch_distributed(ctx, cfg, name, inputs, out, work, run_id)  # noqa: E731
        else:
            produce = lambda out: stage.run(cfg, StageIO(  # noqa: E731
                inputs={role: a.path for role, a in inputs.items()}, out=out, work=work,
                callbacks=[step_logger, StageProgress(name, logger)]))
        with _TRAINING_SLOTS if stage.trains else nullcontext():
            check_stop(f"stage {name}")  # a stop asked while it waited for the training slot
            artifact = store.write(
                name,
                key,
                produce,
                config=section,
                inputs={artifact.stage: artifact for artifact in inputs.values()},  # lineage by stage name
                extra={"prefect_flow_run_id": ctx.flow_run_id, "mlflow_run_id": run_id},
            )
        step_logger.flush()
        result = artifact.manifest.get("result", {})
        # config values a result repeats (augment's k, n_aug, seed) are params already, not metrics
        config_leaves = {key.rsplit(".", 1)[-1] for key in flatten("", section)}
        numbers = [Metric(k, float(v), 0, 0) for k, v in result.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in config_leaves]
        if numbers:
            client.log_batch(run_id, metrics=numbers)
        for path in sorted(artifact.path.iterdir()):
            if path.is_file() and path.suffix == ".md":
                log_markdown(client, run_id, path)
            elif path.is_file() and path.suffix in SMALL_OUTPUTS:
                client.log_artifact(run_id, str(path))
        register_outputs(ctx, cfg, stage, name, key, artifact, logger, run_id)
        if stage.annotates_registry:
            import pandas as pd

            tagged = annotate_versions(artifact.manifest, pd.read_parquet(artifact.path / "summary.parquet"),
                                       cfg.task.eval_split)
            logger.info("%s: scores tagged on %s", name, ", ".join(tagged) or "no registered version")
        client.set_terminated(run_id, "FINISHED")
    except BaseException as exc:
        _record_failure(ctx, name, exc)  # first: the MLflow call below takes time other stages use
        client.set_terminated(run_id, "KILLED" if isinstance(exc, (StopRequested, KeyboardInterrupt)) else "FAILED")
        raise
    logger.info("%s: wrote %s", name, artifact.path)
    return artifact


def register_outputs(ctx: RunContext, cfg: PipelineConfig, stage, name: str, key: str, artifact: Artifact, logger,
                     run_id: str | None) -> None:
    """Register the stage's models (its ``model`` dir, or each exported ``<form>/model.onnx``) as
    versions tagged with the stage key. ``run_id=None``: the artifact came from the cache, and
    only models that have no version for this key are registered, under a new run of the stage.
    That happens when the registration of an earlier run failed after its artifact was written:
    the model is still registered, once."""
    tags = {"kd.key": key, "kd.stage": name, "kd.flow": ctx.flow_name, "kd.profile": cfg.profile, "kd.task": stage.task_of(cfg)}
    wanted = []  # (registry name, register(run_id) -> (version, new))
    if stage.register_as:
        model_dir = artifact.path / "model"
        description = f"{name} of {ctx.flow_name} ({cfg.profile} profile), stage key {key}. from_pretrained dir: {model_dir}"
        registry_name = stage.registry_name(ctx.flow_name, cfg)
        version_tags = {**tags, "kd.role": stage.register_as, "kd.artifact": str(model_dir)}
        wanted.append((registry_name, lambda run, n=registry_name, t=version_tags, d=description: register_model_dir(
            run, model_dir, n, t, pair_task=_is_pair_task(stage.task_of(cfg)), description=d)))
    if stage.registers_onnx:
        for form_dir in sorted(p.parent for p in artifact.path.glob("*/model.onnx")):
            role = f"student-{form_dir.name.replace('_', '-')}"
            registry_name = stage.registry_name(ctx.flow_name, cfg, role)
            version_tags = {**tags, "kd.role": role, "kd.artifact": str(form_dir)}
            description = (f"{form_dir.name} export of the {ctx.flow_name} student ({cfg.profile} profile), stage key {key}. "
                           f"ONNX graph and tokenizer: {form_dir}")
            wanted.append((registry_name, lambda run, f=form_dir, n=registry_name, t=version_tags, d=description:
                           register_onnx(run, f, n, t, description=d)))
    own_run = run_id is None
    if own_run:
        client = MlflowClient()
        wanted = [(n, register) for n, register in wanted if existing_version(client, n, key) is None]
        if not wanted:
            return
        logger.warning("%s: cached, but %s has no version for key %s (an earlier registration did not finish); "
                       "registering it now", name, ", ".join(n for n, _ in wanted), key)
        run_tags = {**tags, "kd.registers_cached": "true", **process_tags()}
        if ctx.parent_run_id:
            run_tags["mlflow.parentRunId"] = ctx.parent_run_id
        run_id = client.create_run(setup_tracking(), run_name=f"{name}:register", tags=run_tags).info.run_id
    for registry_name, register in wanted:
        version, new = register(run_id)
        logger.info("%s: %s %s version %s", name, "registered" if new else "already registered as", registry_name, version)
    if own_run:
        client.set_terminated(run_id, "FINISHED")


def stage_task(name: str):
    """A Prefect task for one stage. Prefect's own cache is off: the artifact store decides."""

    def run(ctx: RunContext, cfg: PipelineConfig, inputs: dict[str, Artifact]):
        return run_stage(ctx, cfg, name, inputs)

    run.__name__ = name
    # the task run is named after its stage, without Prefect's random suffix (a callable, not a
    # template: meta-kd's node names hold '@' and '/')
    return task(name=name, task_run_name=lambda: name, cache_policy=NO_CACHE, persist_result=False)(run)
