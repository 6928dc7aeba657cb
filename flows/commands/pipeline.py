"""`kd run` and `kd stage`: the pipeline from the command line, on an ephemeral Prefect."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

console = Console()


def _overrides(pairs: list[str]) -> tuple[dict, list[str] | None]:
    from kd_core.config import parse_override

    overrides, force = {}, None
    for pair in pairs:
        key, value = parse_override(pair)
        if key == "force":
            force = value if isinstance(value, list) else [value]
        else:
            overrides[key] = value
    return overrides, force


def warm_tracking_store() -> None:
    """Open the MLflow store (schema check, experiment) now: MLflow keeps it per URI, so the flow's
    own setup_tracking later costs nothing."""
    from tasks.tracking import setup_tracking

    setup_tracking()


def register(app: typer.Typer) -> None:
    from flows.profiles import available_profiles
    from flows.registry import FLOW_NAMES, STAGE_NAMES

    flows_help = " | ".join(FLOW_NAMES)
    # one line per flow (rich keeps the blank lines between paragraphs of a docstring)
    stage_doc = (
        "Rerun one stage on the inputs already in the artifact store.\n\n"
        "task_distill names both task-distillation steps, meta_distill@books one domain's nodes. "
        "The stages of each flow (--flow):\n\n"
        + "\n\n".join(f"{flow}: {', '.join(names)}" for flow, names in STAGE_NAMES.items())
    )
    profiles_help = " | ".join(available_profiles()) + " | path/to/profile.yaml"

    @app.command("run")
    def run(
        flow_name: str = typer.Argument(..., help=flows_help),
        profile: str = typer.Option("smoke", help=profiles_help),
        param: Optional[List[str]] = typer.Option(
            None, "--param", "-p", help="key=value override, e.g. task.train_limit=500 or force='[\"augment\"]'"),
    ):
        """Run a pipeline flow in-process (ephemeral Prefect, MLflow on sqlite by default)."""
        from flows.ephemeral import start_early
        from flows.profiles import load_profile
        from flows.registry import FLOW_NAMES, get_flow
        from kd_core.errors import UserError

        server = None
        try:
            overrides, force = _overrides(param or [])
            cfg = load_profile(profile, overrides, force)  # -p typos: pydantic only, no torch, no Prefect
            if flow_name not in FLOW_NAMES:
                raise UserError(f"unknown flow {flow_name!r}; flows: {', '.join(FLOW_NAMES)}")
            server = start_early()  # boots while torch, transformers and MLflow import
            from tasks.stages import dag_for

            # the stage graph checks names, the teacher, the task data: before any flow run exists
            dag_for(flow_name, cfg)
            flow_fn = get_flow(flow_name)
        except (UserError, ValueError) as exc:
            if server is not None:
                server.stop()
            console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(2)
        from flows.console import user_facing

        with user_facing("run"):
            if server is not None:
                warm_tracking_store()  # while the server still boots
                server.wait_ready()
            result = flow_fn(profile=profile, overrides=overrides, force=force)
        console.print(f"report: {result['report']}")

    @app.command("stage", help=stage_doc)
    def stage(
        name: str = typer.Argument(..., help="a stage name, e.g. task_distill or evaluate"),
        profile: str = typer.Option("smoke", help=profiles_help),
        flow_name: str = typer.Option("tinybert-full", "--flow", help=f"whose stage table to use: {flows_help}"),
        param: Optional[List[str]] = typer.Option(None, "--param", "-p", help="key=value override"),
    ):
        """Rerun one stage on the inputs already in the artifact store."""
        from flows.ephemeral import start_early
        from flows.profiles import load_profile
        from kd_core.errors import UserError

        server = None
        try:
            overrides, _ = _overrides(param or [])
            load_profile(profile, overrides)  # -p typos: pydantic only, no torch, no Prefect
            server = start_early()  # boots while torch, transformers and MLflow import
            from flows.single_stage import expand_stage_name, single_stage, stage_overrides
            from tasks.stages import dag_for

            expand_stage_name(name, list(dag_for(flow_name, load_profile(profile, stage_overrides(name, flow_name, overrides)))))
        except (UserError, ValueError) as exc:
            if server is not None:
                server.stop()
            console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(2)
        from flows.console import user_facing

        with user_facing("stage"):
            if server is not None:
                warm_tracking_store()  # while the server still boots
                server.wait_ready()
            written = single_stage(stage=name, profile=profile, overrides=overrides, flow_name=flow_name)
        for path in written:
            print_scores(Path(path))


def print_scores(artifact: Path) -> None:
    """The scores an evaluation stage computed (its metrics.parquet), one row per model."""
    import pandas as pd
    from rich.table import Table

    metrics_file = artifact / "metrics.parquet"
    if (artifact / "export.md").is_file():
        from rich.markdown import Markdown

        console.print(Markdown((artifact / "export.md").read_text()))
    if not metrics_file.is_file():
        return
    frame = pd.read_parquet(metrics_file)
    table = Table(title=f"{artifact.parent.name}: {metrics_file}")
    columns = [c for c in frame.columns if c not in ("task", "rows")]
    for column in columns:
        table.add_column(column, justify="left" if frame[column].dtype == object else "right")
    for row in frame[columns].itertuples(index=False):
        table.add_row(*(f"{value:.2f}" if isinstance(value, float) else str(value) for value in row))
    console.print(table)
