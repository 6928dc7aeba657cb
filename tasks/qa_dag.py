"""The squad-distill stage table: SQuAD data split, QA teacher, TinyBERT general and task
distillation on QA windows, EM/F1 evaluation, benchmark and report.

Built from the same StageDef pieces as the GLUE flows (tasks.stages); the general student's
stages are tinybert-full's own, so one corpus and general student serve both flows.
"""

from __future__ import annotations

from dataclasses import replace

from kd_core import qa_stages as qa
from kd_core.config import PipelineConfig, for_task
from tasks.stages import (
    PREPARE_CORPUS,
    StageDef,
    _dump,
    _evaluation_stages,
    pruned_from_finetuned,
    task_sources_fingerprint,
    task_distill_steps,
    tinybert_dag,
)

QA_DATA_FIELDS = ("version_2", "source", "eval_fraction", "articles", "train_limit", "eval_limit", "seed")
QA_FEATURE_FIELDS = ("max_seq_length", "doc_stride", "max_query_length")


def _qa_data(c: PipelineConfig) -> dict:
    return {"qa": c.qa.model_dump(mode="json", include=set(QA_DATA_FIELDS)),
            "source": task_sources_fingerprint(for_task(c, qa.qa_task_name(c)), _qa_splits(c))}


def _qa_splits(c: PipelineConfig) -> list[str]:
    """The SQuAD splits the QA data stage reads: dev (split by article offline), and train with
    ``qa.source: train-dev``."""
    return ["dev", "train"] if c.qa.source == "train-dev" else ["dev"]


def _qa_features(c: PipelineConfig) -> dict:
    return c.qa.model_dump(mode="json", include=set(QA_FEATURE_FIELDS))


def _task_distill_section(c: PipelineConfig) -> dict:
    return {"task": qa.qa_task_name(c), "qa_features": _qa_features(c), "task_distill": _dump(c.task_distill)}


def squad_dag(cfg: PipelineConfig) -> list[StageDef]:
    if pruned_from_finetuned(cfg):
        raise ValueError("student.prune.source=finetuned is a tinybert-full path; squad-distill prunes the "
                         "pre-trained teacher before general distillation: set student.prune.source=pretrained")
    general = next(s for s in tinybert_dag(cfg) if s.name == "general_distill")
    stages = [
        PREPARE_CORPUS,
        replace(general, task_of=qa.qa_task_name),  # registered as squad-distill-squad-general-student
        StageDef(
            "prepare_qa",
            (),
            _qa_data,
            lambda c, out, work, cb: qa.prepare_qa(c, out),
            task_of=qa.qa_task_name,
        ),
        StageDef(
            "finetune_teacher_qa",
            ("prepare_qa",),
            lambda c: {"teacher": c.teacher, "task": qa.qa_task_name(c), "qa_features": _qa_features(c),
                       "finetune_teacher": _dump(c.finetune_teacher)},
            lambda c, data, out, work, cb: qa.finetune_teacher_qa(c, data, out, work, cb),
            register_as="teacher",
            trains=True,
            task_of=qa.qa_task_name,
        ),
        *task_distill_steps("task_distill_qa", "finetune_teacher_qa", "general_distill", "prepare_qa",
                            _task_distill_section, qa.task_distill_qa, task_of=qa.qa_task_name),
        StageDef(
            "evaluate_qa",
            ("finetune_teacher_qa", "task_distill_qa_prediction", "prepare_qa"),
            lambda c: {"qa": _dump(c.qa)},
            lambda c, teacher, student, data, out, work, cb: qa.evaluate_qa(
                c, {"teacher": teacher, "student": student}, data, out),
            task_of=qa.qa_task_name,
        ),
    ]
    return stages + _shared_benchmark_and_report("task_distill_qa_prediction", tuple(s.name for s in stages if s.trains))


# The GLUE flows' benchmark and report stages, reading the QA stages in place of their GLUE twins.
GLUE_TO_QA = {"finetune_teacher": "finetune_teacher_qa", "evaluate": "evaluate_qa", "prepare_task": "prepare_qa"}


def _shared_benchmark_and_report(student_stage: str, training: tuple[str, ...]) -> list[StageDef]:
    """benchmark and report exactly as tasks.stages defines them (same runs, same sections), with
    their inputs renamed to the QA stages; the report also reads prepare_qa, is titled with the
    QA task and the eval part's split name, and ends with the EM/F1 table and the data note."""
    shared = {s.name: s for s in _evaluation_stages(student_stage, training)}
    rename = lambda names: tuple(GLUE_TO_QA.get(n, n) for n in names)  # noqa: E731
    bench = replace(shared["benchmark"], inputs=rename(shared["benchmark"].inputs))
    base = shared["report"]
    inputs = rename(base.inputs)
    extra = () if "prepare_qa" in inputs else ("prepare_qa",)
    evaluation_at, data_at = inputs.index("evaluate_qa"), (inputs + extra).index("prepare_qa")

    def run(c, *args):
        *dirs, out, work, callbacks = args
        result = base.run(qa.report_config(c, dirs[data_at]), *dirs[: len(inputs)], out, work, callbacks)
        qa.append_qa_report(c, dirs[evaluation_at], dirs[data_at], out)
        return result

    report = replace(
        base,
        inputs=inputs + extra,
        section=lambda c: {**base.section(for_task(c, qa.qa_task_name(c))), "qa_report": {"version_2": c.qa.version_2}},
        run=run,
    )
    return [bench, report]
