"""Rerun one stage from cached inputs: `kd stage task_distill --profile demo`."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from pydantic import Field

from flows.profiles import ProfileName
from flows.registry import FLOW_NAMES
from flows.run import pipeline_run
from kd_core.artifacts import Artifact
from kd_core.errors import UserError
from tasks.runtime import RunContext, stage_key, stage_task
from tasks.stages import dag_for, stage_matches


class MissingUpstreamError(UserError, LookupError):
    pass

FlowName = Annotated[str, Field(json_schema_extra={"enum": list(FLOW_NAMES)})]  # a choice in the run form


def override_args(overrides: dict[str, Any] | None) -> str:
    """`` -p key=value`` for each override, quoted for a shell: the hint must rebuild the same keys."""
    import shlex

    import yaml

    parts = []
    for key, value in (overrides or {}).items():
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        parts.append(f" -p {shlex.quote(f'{key}={text}')}")
    return "".join(parts)


def resolve_inputs(ctx: RunContext, cfg, name: str, overrides: dict[str, Any] | None = None) -> dict[str, Artifact]:
    """The stored artifacts a stage would read, by role, found by recomputing the upstream keys."""
    dag = dag_for(ctx.flow_name, cfg)
    flow_name = ctx.flow_name
    found = {}
    for role, upstream in dag[name].inputs.items():
        key = stage_key(ctx, cfg, upstream, resolve_inputs(ctx, cfg, upstream, overrides))
        artifact, problem = ctx.store.lookup(upstream, key)
        if artifact is None:
            why = f" ({problem})" if problem else ""
            raise MissingUpstreamError(
                f"stage {name} needs {upstream} for this config, and the store has none{why}; run it first: "
                f"kd run {flow_name} --profile {cfg.profile}{override_args(overrides)} "
                f"(or kd stage {upstream} --profile {cfg.profile}{override_args(overrides)})"
            )
        found[role] = artifact
    return found


def stage_overrides(stage: str, flow_name: str, overrides: dict[str, Any] | None) -> dict[str, Any] | None:
    """``kd stage export`` switches the export on: no stage's key, the export's included, depends
    on ``export.enabled`` (a flow without an export stage then says so, naming the key)."""
    if stage == "export":
        return {**(overrides or {}), "export.enabled": True}
    return overrides


def expand_stage_name(name: str, stages: list[str]) -> list[str]:
    """A stage, or the nodes it names the way ``force`` does: ``task_distill`` (both steps),
    ``meta_distill`` (every ``meta_distill@<domain>/...`` node) or ``meta_distill@books``."""
    if name in stages:
        return [name]
    steps = [s for s in stages if stage_matches([name], s)]
    if not steps:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(stages)}")
    return steps


@flow(name="kd-stage", description="Rerun one stage from cached inputs (like `kd stage`).", log_prints=True)
def single_stage(stage: str, profile: ProfileName = "smoke", overrides: dict[str, Any] | None = None,
                 flow_name: FlowName = "tinybert-full") -> list[str]:
    """Run ``stage`` (both steps for task_distill) of ``flow_name`` on the inputs in the store, forced.

    Args:
        stage: the stage to recompute, e.g. task_distill or evaluate (`kd stage --help` lists each flow's stages).
        profile: the profile whose artifacts the stage reads, as for the flow runs that made them.
        overrides: config values over the profile, as `kd stage -p` takes them; they pick which cached inputs are read.
        flow_name: whose stage graph to use, a flow of flows/registry.py (`kd run --help` lists them).
    """
    from flows.profiles import load_profile

    overrides = stage_overrides(stage, flow_name, overrides)
    names = expand_stage_name(stage, list(dag_for(flow_name, load_profile(profile, overrides))))
    with pipeline_run(flow_name, profile, overrides, names) as (ctx, cfg):
        written = []
        for name in names:
            inputs = resolve_inputs(ctx, cfg, name, overrides)
            artifact = stage_task(name)(ctx, cfg, inputs)
            written.append(str(artifact.path))
            print(f"{name}: {artifact.path}")
        return written
