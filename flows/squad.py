"""squad-distill: TinyBERT on SQuAD. A QA teacher, the general student from corpus distillation,
task distillation on the QA windows (intermediate layers, then start/end logits), exact match
and F1 for both, benchmark and report.

Offline only SQuAD v1.1 dev exists, so by default (``qa.source: dev-articles``) the flow trains
on some of its articles and evaluates on the others; every output names those parts
``dev-articles-train`` and ``dev-articles-eval``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.profiles import ProfileName
from flows.run import pipeline_parameters_doc, pipeline_run, summarize
from tasks.benchmark import benchmark
from tasks.general_distill import general_distill
from tasks.prepare_corpus import prepare_corpus
from tasks.qa import evaluate_qa, finetune_teacher_qa, prepare_qa, task_distill_qa_intermediate, task_distill_qa_prediction
from tasks.report import report
from tasks.stages import report_training_inputs

FLOW_NAME = "squad-distill"


DESCRIPTION = "TinyBERT on SQuAD: QA teacher, general + QA task distillation, EM/F1."


@flow(name=FLOW_NAME, description=DESCRIPTION, log_prints=True)
@pipeline_parameters_doc
def squad_distill(profile: ProfileName = "smoke-squad", overrides: dict[str, Any] | None = None, force: list[str] | None = None) -> dict:
    with pipeline_run(FLOW_NAME, profile, overrides, force) as (ctx, cfg):
        # Two independent branches: corpus -> general student, and QA data -> QA teacher.
        corpus = prepare_corpus.submit(ctx, cfg)
        data = prepare_qa.submit(ctx, cfg)
        general = general_distill.submit(ctx, cfg, corpus)
        teacher = finetune_teacher_qa.submit(ctx, cfg, data)
        intermediate = task_distill_qa_intermediate.submit(ctx, cfg, teacher, general, data)
        student = task_distill_qa_prediction.submit(ctx, cfg, teacher, intermediate, data)
        evaluation = evaluate_qa.submit(ctx, cfg, teacher, student, data)
        # Timing waits for evaluation: no other stage competes for the cores while it measures.
        bench = benchmark.submit(ctx, cfg, teacher, student, wait_for=[evaluation])
        # the report draws each training stage's loss curve and states where the QA data came from
        rest = report_training_inputs(FLOW_NAME, cfg, {
            "general_distill": general, "finetune_teacher_qa": teacher, "task_distill_qa_intermediate": intermediate,
            "task_distill_qa_prediction": student, "prepare_qa": data,
        })
        final = report.submit(ctx, cfg, evaluation, bench, *rest)
        return summarize(ctx, final.result())
