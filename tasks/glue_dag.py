"""The GLUE flows' stage tables: tinybert-full and minilm (entries: :class:`tasks.graph.StageDef`),
and the checks that run when a graph is built, before any stage."""

from __future__ import annotations

import functools
from dataclasses import asdict

from kd_core.config import PipelineConfig
from kd_core.stages import glue
from kd_core.stages.common import data_root, under
from tasks.graph import StageDef, dump, source_fingerprint, task_sources_fingerprint


def _models_section(c: PipelineConfig) -> dict:
    return {"teacher": c.teacher, "student": dump(c.student)}


PREPARE_CORPUS = StageDef(
    name="prepare_corpus",
    fn=glue.prepare_corpus,
    section=lambda c: {"teacher": c.teacher, "corpus": dump(c.corpus),
                       "source": source_fingerprint(under(data_root(c), c.corpus.path))},
)
PREPARE_TASK = StageDef(
    name="prepare_task",
    fn=glue.prepare_task,
    section=lambda c: {"task": dump(c.task), "source": task_sources_fingerprint(c)},
)
FINETUNE_TEACHER = StageDef(
    name="finetune_teacher",
    fn=glue.finetune_teacher,
    inputs={"task": "prepare_task"},
    section=lambda c: {"teacher": c.teacher, "task": c.task.name, "max_seq_length": c.task.max_seq_length,
                       "finetune_teacher": dump(c.finetune_teacher)},
    register_as="teacher",
    trains=True,
)


def evaluation_stages(student_stage: str, training: tuple[str, ...] = ()) -> list[StageDef]:
    """evaluate, benchmark and report of the fine-tuned teacher against ``student_stage``; the
    report also reads the ``training`` stages' loss histories. The benchmark runs after the
    evaluation, so that no other stage competes for the cores while it measures."""
    return [
        StageDef(
            name="evaluate",
            fn=glue.evaluate,
            inputs={"teacher": "finetune_teacher", "student": student_stage, "task": "prepare_task"},
            section=lambda c: {"task": dump(c.task)},
        ),
        StageDef(
            name="benchmark",
            fn=glue.benchmark,
            inputs={"teacher": "finetune_teacher", "student": student_stage},
            section=lambda c: {"benchmark": dump(c.benchmark)},
            after=("evaluate",),
        ),
        StageDef(
            name="report",
            fn=glue.report,
            inputs={"evaluation": "evaluate", "benchmark": "benchmark",
                    **{f"{glue.HISTORY_ROLE}{name}": name for name in training}},
            section=lambda c: {"profile": c.profile, "task": c.task.name, "cells": asdict(glue.report_cells(c))},
            annotates_registry=True,
        ),
    ]


def export_stage(student_stage: str) -> StageDef:
    """The student as ONNX and ONNX int8, checked against eager on the evaluation split; it times
    its forms too, so it runs after the benchmark, never beside it."""
    return StageDef(
        name="export",
        fn=glue.export,
        inputs={"student": student_stage, "task": "prepare_task"},
        section=lambda c: {"task": dump(c.task), "export": dump(c.export)},
        after=("benchmark",),
        registers_onnx=True,
    )


def with_evaluation(stages: list[StageDef], student_stage: str, cfg: PipelineConfig) -> list[StageDef]:
    """``stages`` then evaluate, benchmark and a report that reads every training stage among them,
    and the export when ``export.enabled``."""
    exported = [export_stage(student_stage)] if cfg.export.enabled else []
    return stages + evaluation_stages(student_stage, tuple(s.name for s in stages if s.trains)) + exported


PREDICTION_ONLY = ("prediction", "prediction_recipe", "temperature")  # task_distill keys the intermediate step never reads


def task_distill_steps(prefix: str, *, teacher: str, student: str, data: str, section, intermediate_fn, prediction_fn,
                       **stage_kwargs) -> list[StageDef]:
    """TinyBERT's two task-distillation steps, ``<prefix>_intermediate`` then ``<prefix>_prediction``,
    each reading ``teacher``, ``student`` and ``data``. The intermediate step's key leaves out the
    prediction step's settings, so changing those reruns the prediction step alone."""
    intermediate, prediction = f"{prefix}_intermediate", f"{prefix}_prediction"

    def intermediate_section(c: PipelineConfig) -> dict:
        full = section(c)
        return {**full, "task_distill": {k: v for k, v in full["task_distill"].items() if k not in PREDICTION_ONLY}}

    return [
        StageDef(name=intermediate, fn=intermediate_fn, inputs={"teacher": teacher, "student": student, "data": data},
                 section=intermediate_section, trains=True, **stage_kwargs),
        StageDef(name=prediction, fn=prediction_fn, inputs={"teacher": teacher, "student": intermediate, "data": data},
                 section=section, register_as="student", trains=True, **stage_kwargs),
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
    _check_task_once(cfg.task.name, cfg.task.eval_split, str(data_root(cfg)))


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


def tinybert_dag(cfg: PipelineConfig) -> list[StageDef]:
    """Two independent branches: corpus -> general distillation (or, with student.prune.source=finetuned,
    the student cut out of the fine-tuned teacher), and task data -> teacher fine-tuning and
    augmentation; they meet in task distillation, then evaluation, benchmark and report."""
    check_student(cfg)
    check_task(cfg)
    check_mappings(cfg, ("task_distill",) if pruned_from_finetuned(cfg) else ("general_distill", "task_distill"))
    task_distill_section = lambda c: {"task": c.task.name, "max_seq_length": c.task.max_seq_length,  # noqa: E731
                                      "task_distill": dump(c.task_distill)}
    corpus_stages, pruned_stages = [], []
    if pruned_from_finetuned(cfg):
        pruned_stages = [StageDef(
            name="prune_teacher",
            fn=glue.prune_finetuned,
            inputs={"teacher": "finetune_teacher", "task": "prepare_task"},
            section=lambda c: {"task": c.task.name, "max_seq_length": c.task.max_seq_length, **_models_section(c)},
        )]
    else:
        corpus_stages = [PREPARE_CORPUS, StageDef(
            name="general_distill",
            fn=glue.general_distill,
            inputs={"corpus": "prepare_corpus"},
            section=lambda c: {**_models_section(c), "general_distill": dump(c.general_distill)},
            register_as="general-student",
            trains=True,
        )]
    student_stage = (pruned_stages or corpus_stages)[-1].name
    return with_evaluation([
        *corpus_stages,
        PREPARE_TASK,
        FINETUNE_TEACHER,
        *pruned_stages,
        StageDef(
            name="augment",
            fn=glue.augment,
            inputs={"task": "prepare_task"},
            section=lambda c: {"teacher": c.teacher, "augment": dump(c.augment)},
        ),
        *task_distill_steps("task_distill", teacher="finetune_teacher", student=student_stage, data="augment",
                            section=task_distill_section, intermediate_fn=glue.task_distill_intermediate,
                            prediction_fn=glue.task_distill_prediction),
    ], "task_distill_prediction", cfg)


def _finetune_student_stage(cfg: PipelineConfig) -> StageDef:
    """Fine-tuning of the general student; a distilling recipe (DistilBERT baseline) also reads
    the fine-tuned teacher, and its key then includes the mapping that pairs their layers."""
    needs_teacher = cfg.finetune_student.needs_teacher
    return StageDef(
        name="finetune_student",
        fn=glue.finetune_student,
        inputs={"student": "minilm_distill", "task": "prepare_task", **({"teacher": "finetune_teacher"} if needs_teacher else {})},
        section=lambda c: {"task": c.task.name, "max_seq_length": c.task.max_seq_length,
                           "finetune_student": dump(c.finetune_student),
                           **({"mapping": dump(c.task_distill.mapping)} if c.finetune_student.needs_teacher else {})},
        register_as="student",
        trains=True,
    )


def minilm_dag(cfg: PipelineConfig) -> list[StageDef]:
    """MiniLM: general distillation (through a teacher assistant when the student is at most half
    the teacher in depth and width, MiniLM §3.3), then the student is fine-tuned on the task."""
    check_student(cfg)
    check_task(cfg)
    if pruned_from_finetuned(cfg):
        raise ValueError("student.prune.source=finetuned is a tinybert-full path (task distillation from the pruned "
                         "fine-tuned teacher); the minilm flow prunes the pre-trained teacher: set it to pretrained")
    section = lambda c: {**_models_section(c), "minilm": dump(c.minilm)}  # noqa: E731
    stages = [PREPARE_CORPUS]
    assistant = glue.assistant_config(cfg) is not None
    if assistant:
        stages.append(StageDef(name="assistant_distill", fn=glue.assistant_distill, inputs={"corpus": "prepare_corpus"},
                               section=section, register_as="assistant", trains=True))
    stages.append(StageDef(
        name="minilm_distill",
        fn=glue.minilm_distill,
        inputs={"corpus": "prepare_corpus", **({"assistant": "assistant_distill"} if assistant else {})},
        section=section,
        register_as="general-student",
        trains=True,
    ))
    return with_evaluation(stages + [PREPARE_TASK, FINETUNE_TEACHER, _finetune_student_stage(cfg)], "finetune_student", cfg)
