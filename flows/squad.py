"""squad-distill: TinyBERT on SQuAD. A QA teacher, the general student from corpus distillation,
task distillation on the QA windows (intermediate layers, then start/end logits), exact match
and F1 for both, benchmark and report (graph: tasks/qa_dag.py).

Offline only SQuAD v1.1 dev exists, so by default (``qa.source: dev-articles``) the flow trains
on some of its articles and evaluates on the others; every output names those parts
``dev-articles-train`` and ``dev-articles-eval``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.profiles import ProfileName
from flows.run import pipeline_parameters_doc, run_pipeline

FLOW_NAME = "squad-distill"
DESCRIPTION = "TinyBERT on SQuAD: QA teacher, general + QA task distillation, EM/F1."


@flow(name=FLOW_NAME, description=DESCRIPTION, log_prints=True)
@pipeline_parameters_doc
def squad_distill(profile: ProfileName = "smoke-squad", overrides: dict[str, Any] | None = None, force: list[str] | None = None) -> dict:
    return run_pipeline(FLOW_NAME, profile, overrides, force)
