"""`kd report --runs A B ...`: flow runs side by side, from their report summaries in MLflow."""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    import pandas as pd

console = Console()
SUMMARY = "summary.parquet"


class RunLookupError(LookupError):
    pass


@dataclass
class FlowRunSummary:
    run_id: str
    flow: str
    profile: str
    status: str
    started: str
    source: str  # where the summary came from: the report stage's run, or the parent (cached report)
    params: dict[str, str]
    summary: "pd.DataFrame"


def _artifact_names(client, run_id: str) -> set[str]:
    return {item.path for item in client.list_artifacts(run_id)}


def _download(run_id: str, name: str) -> "pd.DataFrame":
    import pandas as pd
    from mlflow.artifacts import download_artifacts

    with tempfile.TemporaryDirectory() as tmp:
        return pd.read_parquet(download_artifacts(run_id=run_id, artifact_path=name, dst_path=tmp))


def load_run_summary(client, run_id: str) -> FlowRunSummary:
    """The report summary of one flow run (an MLflow parent run, as `kd run` prints it)."""
    from mlflow.exceptions import MlflowException

    from tasks.tracking import tracking_uri

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise RunLookupError(
            f"unknown run id {run_id!r} in {tracking_uri()}: pass the MLflow parent run id that `kd run` prints "
            f"(\"MLflow: parent run ...\"); set MLFLOW_TRACKING_URI or KD_HOME if the runs live elsewhere"
        ) from None
    tags = run.data.tags
    if "mlflow.parentRunId" in tags:
        raise RunLookupError(
            f"run {run_id} is the {tags.get('kd.stage', 'stage')!r} stage of flow run {tags['mlflow.parentRunId']}; "
            f"pass the flow run's id"
        )
    if "kd.flow" not in tags:
        raise RunLookupError(f"run {run_id} is not a kd flow run (no kd.flow tag); pass an id that `kd run` printed")
    children = client.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`kd.stage` = 'report'",
        max_results=1,
    )
    if children and SUMMARY in _artifact_names(client, children[0].info.run_id):
        source, summary = f"report run {children[0].info.run_id}", _download(children[0].info.run_id, SUMMARY)
    elif SUMMARY in _artifact_names(client, run_id):  # the report stage was cached in this flow run
        source, summary = "cached report", _download(run_id, SUMMARY)
    else:
        raise RunLookupError(
            f"flow run {run_id} ({tags['kd.flow']}, status {run.info.status}) has no {SUMMARY}: it did not reach "
            f"its report stage, or its flow writes another report (meta-kd: per domain)"
        )
    import pandas as pd

    started = pd.Timestamp(run.info.start_time, unit="ms").strftime("%Y-%m-%d %H:%M")
    return FlowRunSummary(run_id, tags["kd.flow"], tags.get("kd.profile", "?"), run.info.status, started, source,
                          dict(run.data.params), summary)


SHORT_ID_MIN = 4


def resolve_run_id(client, run_id: str) -> str:
    """A full MLflow run id as is; a prefix (the 8 characters the tables print) resolved among
    the kd flow runs of every experiment, and refused when it matches none or several."""
    if len(run_id) == 32:
        return run_id
    if len(run_id) < SHORT_ID_MIN:
        raise RunLookupError(f"run id {run_id!r} is too short: give at least {SHORT_ID_MIN} characters of it")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="tags.`kd.flow` LIKE '%'", max_results=50000) if experiments else []
    matches = [r for r in runs if r.info.run_id.startswith(run_id) and "mlflow.parentRunId" not in r.data.tags]
    if len(matches) == 1:
        return matches[0].info.run_id
    if not matches:
        raise RunLookupError(f"unknown run id {run_id!r}: no kd flow run's id starts with it; pass an id that `kd run` "
                             f"printed, or its first 8 characters")
    listed = ", ".join(f"{r.info.run_id} ({r.data.tags['kd.flow']} · {r.data.tags.get('kd.profile', '?')})" for r in matches[:5])
    raise RunLookupError(f"run id {run_id!r} is ambiguous: {len(matches)} flow runs start with it ({listed}); give more characters")


def config_differences(runs: list[FlowRunSummary]) -> dict[str, list[str]]:
    """Config keys (flattened params of the parent runs) whose values differ between the runs."""
    keys = sorted(set().union(*(r.params for r in runs)))
    return {k: [r.params.get(k, "—") for r in runs] for k in keys if len({r.params.get(k, "—") for r in runs}) > 1}


def _cell(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:{spec}}{suffix}"


COLUMNS = ("run", "flow · profile", "task · split", "model", "score", "retention %", "params (M)", "latency (ms)", "speed-up", "FLOP ratio")


def comparison_rows(runs: list[FlowRunSummary]) -> list[list[list[str]]]:
    """Per run, its table rows (strings, in COLUMNS order)."""
    groups = []
    for r in runs:
        rows = []
        for s in r.summary.itertuples():
            rows.append([
                r.run_id[:8], f"{r.flow} · {r.profile}", f"{s.task} · {s.split}", s.model,
                _cell(float(s.score), ".2f"), _cell(float(s.retention), ".1f"), _cell(float(s.params) / 1e6, ".2f"),
                _cell(float(s.latency_ms), ".2f"), _cell(float(s.speedup), ".2f", "x"),
                _cell(float(s.flop_ratio), ".2f", "x") if "flop_ratio" in r.summary else "—",
            ])
        groups.append(rows)
    return groups


def comparison_markdown(runs: list[FlowRunSummary]) -> str:
    lines = ["# Flow runs compared", ""]
    lines += [f"- `{r.run_id}`: {r.flow} · {r.profile}, started {r.started}, {r.status} ({r.source})" for r in runs]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for rows in comparison_rows(runs):
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    differences = config_differences(runs)
    if differences:
        lines += ["", "Config that differs:", "", "| key | " + " | ".join(r.run_id[:8] for r in runs) + " |",
                  "|" + "---|" * (len(runs) + 1)]
        lines += [f"| {k} | " + " | ".join(v) + " |" for k, v in differences.items()]
    return "\n".join(lines) + "\n"


# The console's columns: the run's flow and profile go in a legend above, so that the table stays
# readable at 80 columns; the markdown keeps every column.
CONSOLE_COLUMNS = ("run", "task", "model", "score", "kept %", "params M", "latency ms", "speed-up", "FLOPs")


def print_comparison(runs: list[FlowRunSummary]) -> None:
    from rich import box

    groups = comparison_rows(runs)
    tasks = {row[2] for rows in groups for row in rows}
    one_task = len(tasks) == 1  # then the task goes into the legend, and the table fits 80 columns
    style = dict(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, collapse_padding=True)
    legend = Table(title="flow runs compared", **style)
    for column in ("run", "flow · profile" + (" · task" if one_task else ""), "started", "status"):
        legend.add_column(column, no_wrap=column == "run")
    for r, rows in zip(runs, groups):
        what = f"{r.flow} · {r.profile}" + (f" · {rows[0][2].replace(' · ', ' ')}" if one_task and rows else "")
        legend.add_row(r.run_id[:8], what, r.started, r.status)
    console.print(legend)
    columns = [c for c in CONSOLE_COLUMNS if not (one_task and c == "task")]
    table = Table(**style)
    for column in columns:
        table.add_column(column, justify="left" if column in ("run", "task", "model") else "right",
                         no_wrap=column in ("run", "model"))
    for rows in groups:
        for row in rows:
            run, _flow, task_split, *rest = row
            table.add_row(run, *([] if one_task else [task_split.replace(" · ", " ")]), *rest)
        table.add_section()
    console.print(table)
    differences = config_differences(runs)
    if differences:
        diff = Table(title="config that differs", **style)
        diff.add_column("key")
        for r in runs:
            diff.add_column(r.run_id[:8], no_wrap=True)
        for key, values in differences.items():
            diff.add_row(key, *values)
        console.print(diff)


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(
        runs: List[str] = typer.Argument(
            ..., help="MLflow parent run ids printed by `kd run`, or their first 8 characters (one or more)", show_default=False),
        _runs_flag: bool = typer.Option(False, "--runs", help="marks the run ids that follow (kd report --runs A B)"),
        out: Optional[Path] = typer.Option(None, help="also write the comparison as markdown here"),
    ):
        """Compare flow runs side by side: score, retention, size, latency and speed-up per model.

        kd report --runs A B [--out comparison.md]
        """
        from mlflow.tracking import MlflowClient

        from tasks.tracking import setup_tracking

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small file per run
        setup_tracking()
        client = MlflowClient()
        try:
            loaded = [load_run_summary(client, resolve_run_id(client, run_id)) for run_id in runs]
        except RunLookupError as exc:
            console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(2)
        print_comparison(loaded)
        if out is not None:
            from kd_core.artifacts import atomic_file

            with atomic_file(out) as tmp:
                Path(tmp).write_text(comparison_markdown(loaded))
            console.print(f"wrote {out}")
