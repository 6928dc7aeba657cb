"""The stage tables: per flow, each stage's hashed config, its inputs and the kd_core call.

Flows compose the @task wrappers in the per-stage modules; `kd stage` walks these tables to
find a stage's inputs in the store without running anything.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from kd_core import stages as core
from kd_core.config import PipelineConfig, for_task


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

    root = core.data_root(cfg)
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


@dataclass(frozen=True)
class StageDef:
    name: str
    inputs: tuple[str, ...]  # upstream stage names, in the order run() takes them
    section: Callable[[PipelineConfig], dict]
    run: Callable[..., dict]  # run(cfg, *input_dirs, out, work, callbacks)
    register_as: str | None = None  # registry name suffix, e.g. "student"
    trains: bool = False  # takes a training slot (see tasks.runtime)
    task_of: Callable[[PipelineConfig], str] = lambda c: c.task.name  # names registered models
    annotates_registry: bool = False  # a report: its scores are tagged on the registered versions
    registers_onnx: bool = False  # an export: each ``<form>/model.onnx`` is registered as ``student-<form>``

    def registry_name(self, flow_name: str, cfg: PipelineConfig, role: str | None = None) -> str:
        """``<flow>-<profile>-<task>-<role>``: one lineage per profile, so a smoke run's random
        model never becomes a version of the demo or paper student."""
        return f"{flow_name}-{cfg.profile}-{self.task_of(cfg)}-{role or self.register_as}"


def _dump(model) -> dict:
    return model.model_dump(mode="json")


def _models_section(c: PipelineConfig) -> dict:
    return {"teacher": c.teacher, "student": _dump(c.student)}


PREPARE_CORPUS = StageDef(
    "prepare_corpus",
    (),
    lambda c: {"teacher": c.teacher, "corpus": _dump(c.corpus),
               "source": source_fingerprint(core._under(core.data_root(c), c.corpus.path))},
    lambda c, out, work, cb: core.prepare_corpus(c, out, cb),
)
PREPARE_TASK = StageDef(
    "prepare_task",
    (),
    lambda c: {"task": _dump(c.task), "source": task_sources_fingerprint(c)},
    lambda c, out, work, cb: core.prepare_task(c, out),
)
FINETUNE_TEACHER = StageDef(
    "finetune_teacher",
    ("prepare_task",),
    lambda c: {"teacher": c.teacher, "task": c.task.name, "max_seq_length": c.task.max_seq_length,
               "finetune_teacher": _dump(c.finetune_teacher)},
    lambda c, task, out, work, cb: core.finetune_teacher(c, task, out, work, cb),
    register_as="teacher",
    trains=True,
)


def _evaluation_stages(student_stage: str, training: tuple[str, ...] = ()) -> list[StageDef]:
    """evaluate, benchmark and report of the fine-tuned teacher against ``student_stage``; the
    report also reads the ``training`` stages' loss histories."""
    return [
        StageDef(
            "evaluate",
            ("finetune_teacher", student_stage, "prepare_task"),
            lambda c: {"task": _dump(c.task)},
            lambda c, teacher, student, task, out, work, cb: core.evaluate(
                c, {"teacher": teacher, "student": student}, task, out),
        ),
        StageDef(
            "benchmark",
            ("finetune_teacher", student_stage),
            lambda c: {"benchmark": _dump(c.benchmark)},
            lambda c, teacher, student, out, work, cb: core.benchmark(c, {"teacher": teacher, "student": student}, out),
        ),
        StageDef(
            "report",
            ("evaluate", "benchmark", *training),
            lambda c: {"profile": c.profile, "task": c.task.name, "cells": asdict(core.report_cells(c))},
            lambda c, evaluation, bench, *rest: core.report(c, evaluation, bench, rest[-3], dict(zip(training, rest[:-3]))),
            annotates_registry=True,
        ),
    ]


def _export_stage(student_stage: str) -> StageDef:
    """The student as ONNX and ONNX int8, checked against eager on the evaluation split; the flows
    run it after the benchmark, so the two never time on the same cores at once."""
    return StageDef(
        "export",
        (student_stage, "prepare_task"),
        lambda c: {"task": _dump(c.task), "export": _dump(c.export)},
        lambda c, student, task, out, work, cb: core.export(c, student, task, out),
        registers_onnx=True,
    )


def _with_evaluation(stages: list[StageDef], student_stage: str, cfg: PipelineConfig) -> list[StageDef]:
    """``stages`` then evaluate, benchmark and a report that reads every training stage among them,
    and the export when ``export.enabled``."""
    exported = [_export_stage(student_stage)] if cfg.export.enabled else []
    return stages + _evaluation_stages(student_stage, tuple(s.name for s in stages if s.trains)) + exported


def report_training_inputs(flow_name: str, cfg: PipelineConfig, produced: dict) -> list:
    """The training results the report stage takes after evaluate and benchmark, in its input order."""
    wanted = dag_for(flow_name, cfg)["report"].inputs[2:]
    missing = [name for name in wanted if name not in produced]
    if missing:
        raise ValueError(f"the {flow_name} report reads the training stages {list(wanted)}; the flow did not pass {missing}")
    return [produced[name] for name in wanted]


PREDICTION_ONLY = ("prediction", "prediction_recipe", "temperature")  # task_distill keys the intermediate step never reads


def task_distill_steps(prefix: str, teacher: str, student: str, data: str, section, run, **stage_kwargs) -> list[StageDef]:
    """TinyBERT's two task-distillation steps, ``<prefix>_intermediate`` then ``<prefix>_prediction``;
    ``run(cfg, step, teacher_dir, student_dir, data_dir, out, work, callbacks)`` does either.
    The intermediate step's key leaves out the prediction step's settings, so changing those
    reruns the prediction step alone."""
    intermediate, prediction = f"{prefix}_intermediate", f"{prefix}_prediction"

    def intermediate_section(c: PipelineConfig) -> dict:
        full = section(c)
        return {**full, "task_distill": {k: v for k, v in full["task_distill"].items() if k not in PREDICTION_ONLY}}

    return [
        StageDef(intermediate, (teacher, student, data), intermediate_section,
                 lambda c, t, s, d, out, work, cb: run(c, "intermediate", t, s, d, out, work, cb),
                 trains=True, **stage_kwargs),
        StageDef(prediction, (teacher, intermediate, data), section,
                 lambda c, t, s, d, out, work, cb: run(c, "prediction", t, s, d, out, work, cb),
                 register_as="student", trains=True, **stage_kwargs),
    ]


def pruned_from_finetuned(cfg: PipelineConfig) -> bool:
    """The task-level path: the student is cut out of the fine-tuned teacher, and task
    distillation starts from it without general distillation."""
    return cfg.student.init == "pruned" and cfg.student.prune.source == "finetuned"


def check_student(cfg: PipelineConfig) -> None:
    """An impossible student shape fails here, when the stage graph is built, before any stage runs."""
    if cfg.student.init in ("pruned", "teacher_layers", "checkpoint"):
        _check_student_once(cfg.teacher, cfg.student.model_dump_json())


@functools.lru_cache(maxsize=64)
def _check_student_once(teacher: str, student_json: str) -> None:
    # dag_for runs for every stage and cache key of a flow run: read the teacher's config once per shape
    from transformers import AutoConfig

    from kd_core.config import StudentConfig
    from kd_core.models.registry import resolve_model
    from kd_core.models.student import check_student_shape

    student = StudentConfig.model_validate_json(student_json)
    checkpoint = AutoConfig.from_pretrained(resolve_model(student.checkpoint)) if student.init == "checkpoint" else None
    check_student_shape(AutoConfig.from_pretrained(resolve_model(teacher)), student, checkpoint)


def check_mappings(cfg: PipelineConfig, sections: tuple[str, ...]) -> None:
    """Each named section's layer mapping fits the student and teacher depths (``student_init``
    mappings are known only once the student is built, and are checked then)."""
    from kd_core.config import ConfigError
    from kd_core.train.recipes import MappingError, map_layers

    for name in sections:
        mapping = getattr(cfg, name).mapping
        if mapping.strategy == "student_init":
            continue
        try:
            map_layers(mapping, cfg.student.num_layers, _teacher_layers(cfg.teacher))
        except MappingError as exc:
            raise ConfigError(f"{name}.mapping: {exc}") from None


@functools.lru_cache(maxsize=16)
def _teacher_layers(teacher: str) -> int:
    from kd_core.models.registry import model_config_dict

    config = model_config_dict(teacher)
    return int(config.get("num_hidden_layers", config.get("n_layers")))


def check_task(cfg: PipelineConfig) -> None:
    """The task exists under the data dir, and the split it is scored on has labels: checked when
    the graph is built, not after the teacher has trained."""
    _check_task_once(cfg.task.name, cfg.task.eval_split, str(core.data_root(cfg)))


@functools.lru_cache(maxsize=64)
def _check_task_once(task: str, eval_split: str, data_dir: str) -> None:
    from kd_core.config import ConfigError
    from kd_core.data.loaders import available_splits, find_split_source, is_unlabeled_split
    from kd_core.data.tasks import get_task

    spec = get_task(task, data_dir)
    if eval_split == "holdout":
        return
    split = spec.resolve_split(eval_split)
    if is_unlabeled_split(split):
        labeled = [s for s in available_splits(spec, data_dir) if not is_unlabeled_split(s)]
        files = find_split_source(spec, data_dir, split).paths
        raise ConfigError(
            f"task.eval_split={eval_split}: {spec.name}'s {split} split ({', '.join(map(str, files)) or 'the hub'}) has no "
            f"labels to score against; use one of the labeled splits: {', '.join(labeled + ['holdout'])}")


def check_force(flow_name: str, force: list[str], stages: list[str]) -> None:
    """``force`` names stages of this flow (or their prefixes, as ``task_distill``)."""
    from kd_core.config import ConfigError

    unknown = [f for f in force if not any(stage_matches([f], name) for name in stages)]
    if unknown:
        raise ConfigError(f"-p force: unknown stage {unknown[0]!r} for {flow_name}; its stages: {', '.join(stages)}")


def tinybert_dag(cfg: PipelineConfig) -> list[StageDef]:
    check_student(cfg)
    check_task(cfg)
    check_mappings(cfg, ("task_distill",) if pruned_from_finetuned(cfg) else ("general_distill", "task_distill"))
    task_distill_section = lambda c: {"task": c.task.name, "max_seq_length": c.task.max_seq_length,  # noqa: E731
                                      "task_distill": _dump(c.task_distill)}
    corpus_stages, pruned_stages = [], []
    if pruned_from_finetuned(cfg):
        pruned_stages = [StageDef(
            "prune_teacher",
            ("finetune_teacher", "prepare_task"),
            lambda c: {"task": c.task.name, "max_seq_length": c.task.max_seq_length, **_models_section(c)},
            lambda c, teacher, task, out, work, cb: core.prune_finetuned(c, teacher, task, out),
        )]
    else:
        corpus_stages = [PREPARE_CORPUS, StageDef(
            "general_distill",
            ("prepare_corpus",),
            lambda c: {**_models_section(c), "general_distill": _dump(c.general_distill)},
            lambda c, corpus, out, work, cb: core.general_distill(c, corpus, out, work, cb),
            register_as="general-student",
            trains=True,
        )]
    student_stage = (pruned_stages or corpus_stages)[-1].name
    return _with_evaluation([
        *corpus_stages,
        PREPARE_TASK,
        FINETUNE_TEACHER,
        *pruned_stages,
        StageDef(
            "augment",
            ("prepare_task",),
            lambda c: {"teacher": c.teacher, "augment": _dump(c.augment)},
            lambda c, task, out, work, cb: core.augment(c, task, out, cb),
        ),
        *task_distill_steps("task_distill", "finetune_teacher", student_stage, "augment",
                            task_distill_section, core.task_distill),
    ], "task_distill_prediction", cfg)


def _finetune_student_stage(cfg: PipelineConfig) -> StageDef:
    """Fine-tuning of the general student; a distilling recipe (DistilBERT baseline) also reads
    the fine-tuned teacher, and its key then includes the mapping that pairs their layers."""
    section = lambda c: {"task": c.task.name, "max_seq_length": c.task.max_seq_length,  # noqa: E731
                         "finetune_student": _dump(c.finetune_student),
                         **({"mapping": _dump(c.task_distill.mapping)} if c.finetune_student.needs_teacher else {})}
    teacher = ("finetune_teacher",) if cfg.finetune_student.needs_teacher else ()

    def run(c, student, task, *rest):
        *teacher_dir, out, work, cb = rest
        return core.finetune_student(c, student, task, out, work, cb, teacher_dir=(teacher_dir or [None])[0])

    return StageDef("finetune_student", ("minilm_distill", "prepare_task", *teacher), section, run,
                    register_as="student", trains=True)


def minilm_dag(cfg: PipelineConfig) -> list[StageDef]:
    """MiniLM: general distillation (through a teacher assistant when the student is small),
    then the student is fine-tuned on the task, as in the MiniLM paper."""
    check_student(cfg)
    check_task(cfg)
    if pruned_from_finetuned(cfg):
        raise ValueError("student.prune.source=finetuned is a tinybert-full path (task distillation from the pruned "
                         "fine-tuned teacher); the minilm flow prunes the pre-trained teacher: set it to pretrained")
    section = lambda c: {**_models_section(c), "minilm": _dump(c.minilm)}  # noqa: E731
    stages = [PREPARE_CORPUS]
    if core.assistant_config(cfg) is not None:
        stages.append(StageDef(
            "assistant_distill",
            ("prepare_corpus",),
            section,
            lambda c, corpus, out, work, cb: core.assistant_distill(c, corpus, out, work, cb),
            register_as="assistant",
            trains=True,
        ))
        stages.append(StageDef(
            "minilm_distill",
            ("prepare_corpus", "assistant_distill"),
            section,
            lambda c, corpus, assistant, out, work, cb: core.minilm_distill(c, corpus, out, work, cb, assistant),
            register_as="general-student",
            trains=True,
        ))
    else:
        stages.append(StageDef(
            "minilm_distill",
            ("prepare_corpus",),
            section,
            lambda c, corpus, out, work, cb: core.minilm_distill(c, corpus, out, work, cb),
            register_as="general-student",
            trains=True,
        ))
    return _with_evaluation(stages + [
        PREPARE_TASK,
        FINETUNE_TEACHER,
        _finetune_student_stage(cfg),
    ], "finetune_student", cfg)


def _for_domain(stage: StageDef, domain: str, inputs: tuple[str, ...]) -> StageDef:
    """``stage`` run on the task ``amazon-<domain>``, as node ``<stage>@<domain>``."""
    task = f"amazon-{domain}"
    return StageDef(
        f"{stage.name}@{domain}",
        inputs,
        lambda c: stage.section(for_task(c, task)),
        lambda c, *args: stage.run(for_task(c, task), *args),
        register_as=stage.register_as,
        trains=stage.trains,
        task_of=lambda c: task,
    )


def metakd_dag(cfg: PipelineConfig) -> list[StageDef]:
    """Meta-KD across the Amazon domains: teachers, three students per (target, fraction, seed),
    evaluations and the report (stage table in tasks.metakd_dag)."""
    from tasks.metakd_dag import metakd_dag as build  # imported late: tasks.metakd_dag builds on this module

    return build(cfg)


def squad_dag(cfg: PipelineConfig) -> list[StageDef]:
    """SQuAD: QA teacher, general + QA task distillation, EM/F1 (stage table in tasks.qa_dag)."""
    from tasks.qa_dag import squad_dag as build  # imported late: tasks.qa_dag builds on this module

    return build(cfg)


EXPORTING_FLOWS = ("tinybert-full", "minilm")
DAGS = {"tinybert-full": tinybert_dag, "minilm": minilm_dag, "meta-kd": metakd_dag, "squad-distill": squad_dag}


def dag_for(flow_name: str, cfg: PipelineConfig) -> dict[str, StageDef]:
    if flow_name not in DAGS:
        raise ValueError(f"unknown flow {flow_name!r}; flows with stages: {', '.join(DAGS)}")
    if cfg.export.enabled and flow_name not in EXPORTING_FLOWS:
        from kd_core.config import ConfigError

        raise ConfigError(f"export.enabled: {flow_name} has no export stage (it exports a GLUE classifier); "
                          f"flows with one: {', '.join(EXPORTING_FLOWS)}")
    dag = {stage.name: stage for stage in DAGS[flow_name](cfg)}
    check_force(flow_name, list(cfg.force), list(dag))
    return dag


def stage_matches(force: list[str], name: str) -> bool:
    """``force=["task_distill"]`` covers both task_distill steps; ``force=["meta_distill"]`` every
    ``meta_distill@<domain>/...`` node, ``force=["meta_distill@books"]`` that domain's."""
    return any(name == f or name.startswith((f + "_", f + "@", f + "/")) for f in force)
