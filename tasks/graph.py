"""The stage graph as data: a flow is a list of :class:`StageDef`, in topological order.

Each entry names the stage, its inputs by role (``{"teacher": "finetune_teacher"}``), the config
fields it reads (``section``: what its cache key hashes), the ``kd_core`` function it calls,
ordering-only edges (``after``) and whether it trains. ``flows.run.submit_graph`` submits any
graph; ``tasks.runtime`` runs one entry; ``kd stage`` walks the same entries to find a stage's
inputs in the store. The per-flow tables: tasks/glue_dag.py, tasks/qa_dag.py, tasks/metakd_dag.py.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from kd_core.config import PipelineConfig, for_task
from kd_core.stages.common import StageIO


@dataclass(frozen=True)
class StageDef:
    name: str
    fn: Callable[[PipelineConfig, StageIO], dict]  # a kd_core stage function (a functools.partial for a parametrised node)
    section: Callable[[PipelineConfig], dict]  # the config fields fn reads: hashed into the stage's key
    inputs: Mapping[str, str] = field(default_factory=dict)  # role -> upstream node; fn reads io[role]
    after: tuple[str, ...] = ()  # ordering only: runs after these nodes, reads nothing of theirs
    trains: bool = False  # takes a training slot (see tasks.runtime)
    register_as: str | None = None  # registry name suffix, e.g. "student"
    task_of: Callable[[PipelineConfig], str] = lambda c: c.task.name  # names registered models
    annotates_registry: bool = False  # a report: its scores are tagged on the registered versions
    registers_onnx: bool = False  # an export: each ``<form>/model.onnx`` is registered as ``student-<form>``
    config_for: Callable[[PipelineConfig], PipelineConfig] | None = None  # the config fn sees (meta-kd: a domain's task)

    @property
    def upstream(self) -> tuple[str, ...]:
        """The nodes whose artifacts it reads, in the order its entry lists them."""
        return tuple(self.inputs.values())

    def run(self, cfg: PipelineConfig, io: StageIO) -> dict:
        return self.fn(self.config_for(cfg) if self.config_for else cfg, io)

    @property
    def code(self) -> str:
        """A hash of the kd_core source that ``fn`` can run (kd_core.fingerprint): its cache key's code part."""
        from kd_core.fingerprint import code_fingerprint

        return code_fingerprint(self.fn)

    def registry_name(self, flow_name: str, cfg: PipelineConfig, role: str | None = None) -> str:
        """``<flow>-<profile>-<task>-<role>``: one lineage per profile, so a smoke run's random
        model never becomes a version of the demo or paper student."""
        return f"{flow_name}-{cfg.profile}-{self.task_of(cfg)}-{role or self.register_as}"


def check_graph(flow_name: str, stages: list[StageDef]) -> dict[str, StageDef]:
    """``{name: stage}``, after checking that every input and ``after`` edge names an earlier node."""
    graph: dict[str, StageDef] = {}
    for stage in stages:
        if stage.name in graph:
            raise ValueError(f"{flow_name}: stage {stage.name} is declared twice")
        unknown = [n for n in (*stage.upstream, *stage.after) if n not in graph]
        if unknown:
            raise ValueError(f"{flow_name}: stage {stage.name} reads {unknown}, which no earlier entry declares")
        graph[stage.name] = stage
    return graph


def descendants(graph: Mapping[str, StageDef], names: set[str]) -> set[str]:
    """``names`` and every node that reads one of them, directly or not (ordering edges excluded)."""
    found = set(names)
    for name, stage in graph.items():  # topological: an input is seen before its readers
        if found.intersection(stage.upstream):
            found.add(name)
    return found


def dump(model) -> dict:
    return model.model_dump(mode="json")


def for_domain(stage: StageDef, domain: str, inputs: Mapping[str, str]) -> StageDef:
    """``stage`` run on the task ``amazon-<domain>``, as node ``<stage>@<domain>``."""
    task = f"amazon-{domain}"
    return StageDef(
        name=f"{stage.name}@{domain}",
        fn=stage.fn,
        section=lambda c: stage.section(for_task(c, task)),
        inputs=inputs,
        trains=stage.trains,
        register_as=stage.register_as,
        task_of=lambda c: task,
        config_for=lambda c: for_task(c, task),
    )


def source_fingerprint(path: Path) -> str:
    """Names and sizes of raw input files: cheap, and it changes when the data does."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(f"{file.relative_to(path.parent)}:{file.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def task_sources_fingerprint(cfg: PipelineConfig, splits: list[str] | None = None) -> str:
    """The content of the files a task stage reads (default: train and the evaluated split), found
    by the loaders' own search, so any layout they accept (``SST-2/`` directly under the data dir,
    an export) invalidates the stage when its data changes."""
    from kd_core.data.loaders import find_split_source
    from kd_core.data.tasks import get_task
    from kd_core.stages.common import data_root

    root = data_root(cfg)
    spec = get_task(cfg.task.name, root)
    if splits is None:
        splits = [spec.train_split] + ([cfg.task.eval_split] if cfg.task.eval_split != "holdout" else [])
    digest = hashlib.sha256()
    for split in sorted(set(splits)):
        source = find_split_source(spec, root, split)
        digest.update(f"{split}:{source.layout}\n".encode())
        for path in map(Path, source.paths):
            stat = path.stat()
            digest.update(f"{path.name}:{_file_digest(str(path), stat.st_size, stat.st_mtime_ns)}\n".encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    # keyed on size and mtime too: stage keys are computed many times per run, files read once
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
