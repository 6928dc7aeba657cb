"""minilm: MiniLM / MiniLMv2 general distillation (through a teacher assistant when the student
is at most half the teacher in depth and width, MiniLM §3.3), then task fine-tuning and
evaluation of the student against the fine-tuned teacher."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.profiles import ProfileName
from flows.run import pipeline_parameters_doc, pipeline_run, summarize
from kd_core.stages import assistant_config
from tasks.assistant_distill import assistant_distill
from tasks.benchmark import benchmark
from tasks.evaluate import evaluate
from tasks.export import export
from tasks.finetune_student import finetune_student
from tasks.finetune_teacher import finetune_teacher
from tasks.minilm_distill import minilm_distill
from tasks.prepare_corpus import prepare_corpus
from tasks.prepare_task import prepare_task
from tasks.report import report
from tasks.stages import report_training_inputs

FLOW_NAME = "minilm"


DESCRIPTION = "MiniLM / MiniLMv2 general distillation (teacher assistant when the student is small), fine-tuning, evaluation."


@flow(name=FLOW_NAME, description=DESCRIPTION, log_prints=True)
@pipeline_parameters_doc
def minilm(profile: ProfileName = "smoke", overrides: dict[str, Any] | None = None, force: list[str] | None = None) -> dict:
    with pipeline_run(FLOW_NAME, profile, overrides, force) as (ctx, cfg):
        corpus = prepare_corpus.submit(ctx, cfg)
        task_data = prepare_task.submit(ctx, cfg)
        teacher = finetune_teacher.submit(ctx, cfg, task_data)
        if assistant_config(cfg) is not None:
            print("student is at most half the teacher in depth and width: distilling through an assistant")
            assistant = assistant_distill.submit(ctx, cfg, corpus)
            general = minilm_distill.submit(ctx, cfg, corpus, assistant)
        else:
            general = minilm_distill.submit(ctx, cfg, corpus)
        # The DistilBERT-style baseline (finetune_student.recipe=distilbert) distils from the teacher.
        extra = (teacher,) if cfg.finetune_student.needs_teacher else ()
        student = finetune_student.submit(ctx, cfg, general, task_data, *extra)
        evaluation = evaluate.submit(ctx, cfg, teacher, student, task_data)
        # Timing waits for evaluation: no other stage competes for the cores while it measures.
        bench = benchmark.submit(ctx, cfg, teacher, student, wait_for=[evaluation])
        trained = {"minilm_distill": general, "finetune_teacher": teacher, "finetune_student": student}
        if assistant_config(cfg) is not None:
            trained["assistant_distill"] = assistant
        # the report draws each training stage's loss curve
        training = report_training_inputs(FLOW_NAME, cfg, trained)
        final = report.submit(ctx, cfg, evaluation, bench, *training)
        # the export times its forms too: after the benchmark, never beside it
        exported = export.submit(ctx, cfg, student, task_data, wait_for=[bench]) if cfg.export.enabled else None
        return summarize(ctx, final.result(), exported.result() if exported else None)
