"""The squad-distill stage table: SQuAD data split, QA teacher, TinyBERT general and task
distillation on QA windows, EM/F1 evaluation, benchmark and report.

Built from the same StageDef pieces as the GLUE flows (tasks.glue_dag); the general student's
stages are tinybert-full's own, so one corpus and general student serve both flows.
"""

from __future__ import annotations

from dataclasses import replace

from kd_core.config import PipelineConfig, for_task
from kd_core.stages import qa
from tasks.glue_dag import PREPARE_CORPUS, evaluation_stages, pruned_from_finetuned, task_distill_steps, tinybert_dag
from tasks.graph import StageDef, dump, task_sources_fingerprint

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
    return {"task": qa.qa_task_name(c), "qa_features": _qa_features(c), "task_distill": dump(c.task_distill)}


def squad_dag(cfg: PipelineConfig) -> list[StageDef]:
    if pruned_from_finetuned(cfg):
        raise ValueError("student.prune.source=finetuned is a tinybert-full path; squad-distill prunes the "
                         "pre-trained teacher before general distillation: set student.prune.source=pretrained")
    general = next(s for s in tinybert_dag(cfg) if s.name == "general_distill")
    stages = [
        PREPARE_CORPUS,
        replace(general, task_of=qa.qa_task_name),  # registered as squad-distill-squad-general-student
        StageDef(name="prepare_qa", fn=qa.prepare_qa, section=_qa_data, task_of=qa.qa_task_name),
        StageDef(
            name="finetune_teacher_qa",
            fn=qa.finetune_teacher_qa,
            inputs={"data": "prepare_qa"},
            section=lambda c: {"teacher": c.teacher, "task": qa.qa_task_name(c), "qa_features": _qa_features(c),
                               "finetune_teacher": dump(c.finetune_teacher)},
            register_as="teacher",
            trains=True,
            task_of=qa.qa_task_name,
        ),
        *task_distill_steps("task_distill_qa", teacher="finetune_teacher_qa", student="general_distill", data="prepare_qa",
                            section=_task_distill_section, intermediate_fn=qa.task_distill_qa_intermediate,
                            prediction_fn=qa.task_distill_qa_prediction, task_of=qa.qa_task_name),
        StageDef(
            name="evaluate_qa",
            fn=qa.evaluate_qa,
            inputs={"teacher": "finetune_teacher_qa", "student": "task_distill_qa_prediction", "data": "prepare_qa"},
            section=lambda c: {"qa": dump(c.qa)},
            task_of=qa.qa_task_name,
        ),
    ]
    return stages + _shared_benchmark_and_report("task_distill_qa_prediction", tuple(s.name for s in stages if s.trains))


# The GLUE flows' benchmark and report stages, reading the QA stages in place of their GLUE twins.
GLUE_TO_QA = {"finetune_teacher": "finetune_teacher_qa", "evaluate": "evaluate_qa", "prepare_task": "prepare_qa"}


def _shared_benchmark_and_report(student_stage: str, training: tuple[str, ...]) -> list[StageDef]:
    """benchmark and report exactly as tasks.glue_dag defines them (same sections), with their
    inputs renamed to the QA stages; the report also reads prepare_qa, is titled with the QA task
    and the eval part's split name, and ends with the EM/F1 table and the data note."""
    shared = {s.name: s for s in evaluation_stages(student_stage, training)}
    rename = lambda inputs: {role: GLUE_TO_QA.get(node, node) for role, node in inputs.items()}  # noqa: E731
    bench = replace(shared["benchmark"], inputs=rename(shared["benchmark"].inputs),
                    after=tuple(GLUE_TO_QA.get(node, node) for node in shared["benchmark"].after))
    base = shared["report"]
    report = replace(
        base,
        fn=qa.report,
        inputs={**rename(base.inputs), "data": "prepare_qa"},
        section=lambda c: {**base.section(for_task(c, qa.qa_task_name(c))), "qa_report": {"version_2": c.qa.version_2}},
    )
    return [bench, report]
