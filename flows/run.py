"""What every pipeline flow does around its stages: profile, parent MLflow run, summary."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from flows.console import RunInterrupted, stop_on_signals
from flows.profiles import load_profile
from kd_core.artifacts import Artifact
from kd_core.models.registry import kd_home
from kd_core.stop import STOP_REQUESTED, StopRequested
from tasks.runtime import RunContext, StageFailed, close_abandoned_runs, first_failure, process_tags, stage_task
from tasks.stages import dag_for
from tasks.tracking import flatten, log_markdown, setup_tracking, tracking_uri


def pipeline_parameters_doc(fn):
    """Appends the pipeline flows' shared ``Args:`` section to ``fn``'s docstring: Prefect shows
    these as the parameter descriptions of every deployment's run form."""
    from flows.profiles import available_profiles

    fn.__doc__ = ((fn.__doc__ or fn.__name__).strip() + "\n\nArgs:\n"
                  f"    profile: a profile in flows/profiles ({', '.join(available_profiles())}) or a path to a profile YAML.\n"
                  '    overrides: config values over the profile, as `kd run -p` takes them: {"task.train_limit": 500}.\n'
                  '    force: stages to recompute even when cached, e.g. ["augment"]; task_distill names both of its steps.\n')
    return fn


def _prefect_flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return str(run_id) if run_id else None


def _prefect_flow_run_name() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.name or None


def prefect_flow_run_url(flow_run_id: str | None) -> str | None:
    """The flow run's page in the Prefect UI, when a served Prefect (not the ephemeral one) is in use."""
    import os

    from prefect.settings import PREFECT_UI_URL

    from flows.ephemeral import EPHEMERAL_MARK

    # `kd run`'s own ephemeral server serves no UI (flows.ephemeral)
    if not flow_run_id or not os.environ.get("PREFECT_API_URL") or os.environ.get(EPHEMERAL_MARK):
        return None
    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None


def mlflow_run_url(experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI, when the tracking store is a server."""
    uri = tracking_uri()
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" if uri.startswith("http") else None


@contextmanager
def pipeline_run(flow_name: str, profile: str, overrides: dict[str, Any] | None, force: list[str] | None):
    import os
    import sys

    # per-load weight bars would flood the flow-run logs; a cached run never imports transformers,
    # which reads this variable when it is first imported
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    STOP_REQUESTED.clear()  # a stop asked of an earlier run in this process is not this run's
    cfg = load_profile(profile, overrides, force)
    experiment_id = setup_tracking()
    client = MlflowClient()
    flow_run_id = _prefect_flow_run_id()
    close_abandoned_runs(client, experiment_id)
    tags = {"kd.flow": flow_name, "kd.profile": cfg.profile, **process_tags()}
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    if url := prefect_flow_run_url(flow_run_id):
        tags["prefect.flow_run_url"] = url
    # distinct names in the runs table: flow, profile and Prefect's name for this flow run
    run_name = ":".join(part for part in (flow_name, cfg.profile, _prefect_flow_run_name()) if part)
    parent = client.create_run(experiment_id, run_name=run_name, tags=tags)
    params = [Param(k, v) for k, v in flatten("", cfg.model_dump(mode="json")).items()]
    for start in range(0, len(params), 100):
        client.log_batch(parent.info.run_id, params=params[start : start + 100])
    ctx = RunContext(str(kd_home()), flow_name, parent.info.run_id, flow_run_id, tuple(cfg.force))
    try:
        with stop_on_signals():
            yield ctx, cfg
    except BaseException as exc:
        failure = first_failure(ctx.parent_run_id)
        cause = failure[1] if failure else exc
        interrupted = isinstance(cause, (StopRequested, KeyboardInterrupt))
        client.set_terminated(parent.info.run_id, "KILLED" if interrupted else "FAILED")
        if failure and failure[1] is not exc:
            # the stage that raised, not a downstream stage's "Run is in PENDING state"
            if interrupted:
                raise RunInterrupted(f"stage {failure[0]} {cause}") from cause
            raise StageFailed(*failure) from cause
        raise
    finally:
        first_failure(ctx.parent_run_id)  # a failure the flow handled itself is not kept around
    client.set_terminated(parent.info.run_id, "FINISHED")


def headline_metrics(summary_path) -> dict[str, float]:
    """Per model: score, retention, speed-up, latency (the MLflow runs table sorts by these)."""
    import math

    import pandas as pd

    if not summary_path.is_file():
        return {}
    summary = pd.read_parquet(summary_path)
    if not {"model", "split", "score", "retention", "speedup", "latency_ms"} <= set(summary.columns):
        return {}  # the Meta-KD report's table has its own shape
    primary = summary["split"].iloc[0] if len(summary) else None
    metrics = {}
    for row in summary[summary["split"] == primary].itertuples():
        for name, value in (("score", row.score), ("retention", row.retention), ("speedup", row.speedup),
                            ("latency_ms", row.latency_ms)):
            if value is not None and math.isfinite(float(value)):
                metrics[f"{row.model}_{name}"] = float(value)
    return metrics


def _publish_to_prefect(report_text: str, mlflow_url: str | None) -> None:
    """The report as a markdown artifact on the flow run, and a link to its MLflow run."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    create_markdown_artifact(report_text, key="kd-report", description="kd-pipeline report (report.md)")
    if mlflow_url:
        create_link_artifact(mlflow_url, link_text="MLflow parent run", key="kd-mlflow-run",
                             description="the flow run's parent run in MLflow")


def summarize(ctx: RunContext, report: Artifact, exported: Artifact | None = None) -> dict:
    """Attach the report (and the export's table, when the flow exported) to the parent run and
    say where to look."""
    client = MlflowClient()
    report_md = report.path / "report.md"
    log_markdown(client, ctx.parent_run_id, report_md)
    # plots and the summary too: a cached report stage has no run of its own in this flow run,
    # and `kd report --runs` reads summary.parquet from here
    for extra in sorted(report.path.iterdir()):
        if extra.suffix in (".png", ".parquet") and not extra.name.startswith("."):
            client.log_artifact(ctx.parent_run_id, str(extra))
    client.set_tag(ctx.parent_run_id, "kd.report", str(report.path))
    headline = headline_metrics(report.path / "summary.parquet")
    if headline:
        client.log_batch(ctx.parent_run_id, metrics=[Metric(k, v, 0, 0) for k, v in headline.items()])
    text = report_md.read_text()
    if exported is not None:
        log_markdown(client, ctx.parent_run_id, exported.path / "export.md")
        client.log_artifact(ctx.parent_run_id, str(exported.path / "export.parquet"))
        numbers = exported.manifest.get("result", {})
        client.log_batch(ctx.parent_run_id, metrics=[Metric(f"export/{k}", float(v), 0, 0) for k, v in numbers.items()])
        text += "\n" + (exported.path / "export.md").read_text().replace("# ", "## ", 1)
    run = client.get_run(ctx.parent_run_id)
    url = mlflow_run_url(run.info.experiment_id, ctx.parent_run_id)
    _publish_to_prefect(text, url)
    print(text)
    where = url or f"{ctx.parent_run_id} in {tracking_uri()} (make ui to browse)"
    print(f"MLflow: parent run {where}")
    return {"report": str(report_md), "mlflow_run_id": ctx.parent_run_id, "report_text": text,
            **({"export": str(exported.path)} if exported is not None else {})}


def submit_graph(ctx: RunContext, cfg) -> dict:
    """Submit every stage of the flow's graph, in its topological order, each with its inputs by
    role and its ordering-only edges as ``wait_for``: ``{name: future}``."""
    futures: dict = {}
    graph = dag_for(ctx.flow_name, cfg)
    for stage in graph.values():
        stage.code  # noqa: B018 - the code fingerprints, once, before the stage threads ask for them
    for name, stage in graph.items():
        inputs = {role: futures[node] for role, node in stage.inputs.items()}
        futures[name] = stage_task(name).submit(ctx, cfg, inputs, wait_for=[futures[node] for node in stage.after])
    return futures


def run_pipeline(flow_name: str, profile: str, overrides: dict[str, Any] | None, force: list[str] | None) -> dict:
    """The body of every pipeline flow: its graph submitted, the report (and the export, when the
    graph has one) attached to the parent run."""
    with pipeline_run(flow_name, profile, overrides, force) as (ctx, cfg):
        futures = submit_graph(ctx, cfg)
        exported = futures["export"].result() if "export" in futures else None
        return summarize(ctx, futures["report"].result(), exported)

