"""tinybert-full: general distillation, teacher fine-tuning, augmentation, task distillation
(intermediate then prediction layer), evaluation, benchmark and report."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.profiles import ProfileName
from flows.run import pipeline_parameters_doc, pipeline_run, summarize
from tasks.augment import augment
from tasks.benchmark import benchmark
from tasks.evaluate import evaluate
from tasks.export import export
from tasks.finetune_teacher import finetune_teacher
from tasks.general_distill import general_distill
from tasks.prepare_corpus import prepare_corpus
from tasks.prepare_task import prepare_task
from tasks.report import report
from tasks.prune_teacher import prune_teacher
from tasks.stages import pruned_from_finetuned, report_training_inputs
from tasks.task_distill_intermediate import task_distill_intermediate
from tasks.task_distill_prediction import task_distill_prediction

FLOW_NAME = "tinybert-full"


DESCRIPTION = "TinyBERT end to end: general + task distillation with augmentation, evaluation, benchmark, report."


@flow(name=FLOW_NAME, description=DESCRIPTION, log_prints=True)
@pipeline_parameters_doc
def tinybert_full(profile: ProfileName = "smoke", overrides: dict[str, Any] | None = None, force: list[str] | None = None) -> dict:
    with pipeline_run(FLOW_NAME, profile, overrides, force) as (ctx, cfg):
        # Two independent branches run concurrently: corpus -> general distillation, and
        # task data -> teacher fine-tuning / augmentation. With student.prune.source=finetuned the
        # student is cut out of the fine-tuned teacher instead, and no general distillation runs.
        task_data = prepare_task.submit(ctx, cfg)
        teacher = finetune_teacher.submit(ctx, cfg, task_data)
        if pruned_from_finetuned(cfg):
            general = prune_teacher.submit(ctx, cfg, teacher, task_data)
        else:
            corpus = prepare_corpus.submit(ctx, cfg)
            general = general_distill.submit(ctx, cfg, corpus)
        augmented = augment.submit(ctx, cfg, task_data)
        intermediate = task_distill_intermediate.submit(ctx, cfg, teacher, general, augmented)
        student = task_distill_prediction.submit(ctx, cfg, teacher, intermediate, augmented)
        evaluation = evaluate.submit(ctx, cfg, teacher, student, task_data)
        # Timing waits for evaluation: no other stage competes for the cores while it measures.
        bench = benchmark.submit(ctx, cfg, teacher, student, wait_for=[evaluation])
        # the report draws each training stage's loss curve
        training = report_training_inputs(FLOW_NAME, cfg, {
            "general_distill": general, "finetune_teacher": teacher,
            "task_distill_intermediate": intermediate, "task_distill_prediction": student,
        })
        final = report.submit(ctx, cfg, evaluation, bench, *training)
        # the export times its forms too: after the benchmark, never beside it
        exported = export.submit(ctx, cfg, student, task_data, wait_for=[bench]) if cfg.export.enabled else None
        return summarize(ctx, final.result(), exported.result() if exported else None)
