"""Every flow's stage graph by flow name: ``dag_for(flow, cfg)`` builds it from the flow's table
(tasks/glue_dag.py, tasks/qa_dag.py, tasks/metakd_dag.py) and checks it, and the config's
``force`` names, before any stage runs."""

from __future__ import annotations

from importlib import import_module

from kd_core.config import ConfigError, PipelineConfig
from tasks.graph import StageDef, check_graph

EXPORTING_FLOWS = ("tinybert-full", "minilm")
# flow -> (table module, graph builder); imported on use: meta-kd's and squad's stage code import
# torch, which a cached tinybert-full run never loads
DAGS: dict[str, tuple[str, str]] = {
    "tinybert-full": ("tasks.glue_dag", "tinybert_dag"),
    "minilm": ("tasks.glue_dag", "minilm_dag"),
    "meta-kd": ("tasks.metakd_dag", "metakd_dag"),
    "squad-distill": ("tasks.qa_dag", "squad_dag"),
}


def dag_for(flow_name: str, cfg: PipelineConfig) -> dict[str, StageDef]:
    """``{name: stage}`` in topological order."""
    if flow_name not in DAGS:
        raise ValueError(f"unknown flow {flow_name!r}; flows with stages: {', '.join(DAGS)}")
    if cfg.export.enabled and flow_name not in EXPORTING_FLOWS:
        raise ConfigError(f"export.enabled: {flow_name} has no export stage (it exports a GLUE classifier); "
                          f"flows with one: {', '.join(EXPORTING_FLOWS)}")
    module, builder = DAGS[flow_name]
    dag = check_graph(flow_name, getattr(import_module(module), builder)(cfg))
    check_force(flow_name, list(cfg.force), list(dag))
    return dag


def check_force(flow_name: str, force: list[str], stages: list[str]) -> None:
    """``force`` names stages of this flow (or their prefixes, as ``task_distill``)."""
    unknown = [f for f in force if not any(stage_matches([f], name) for name in stages)]
    if unknown:
        raise ConfigError(f"-p force: unknown stage {unknown[0]!r} for {flow_name}; its stages: {', '.join(stages)}")


def stage_matches(force: list[str], name: str) -> bool:
    """``force=["task_distill"]`` covers both task_distill steps; ``force=["meta_distill"]`` every
    ``meta_distill@<domain>/...`` node, ``force=["meta_distill@books"]`` that domain's."""
    return any(name == f or name.startswith((f + "_", f + "@", f + "/")) for f in force)
