"""minilm: MiniLM / MiniLMv2 general distillation (through a teacher assistant when the student
is at most half the teacher in depth and width, MiniLM §3.3), then task fine-tuning and
evaluation of the student against the fine-tuned teacher (graph: tasks/glue_dag.py)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.profiles import ProfileName
from flows.run import pipeline_parameters_doc, run_pipeline

FLOW_NAME = "minilm"
DESCRIPTION = "MiniLM / MiniLMv2 general distillation (teacher assistant when the student is small), fine-tuning, evaluation."


@flow(name=FLOW_NAME, description=DESCRIPTION, log_prints=True)
@pipeline_parameters_doc
def minilm(profile: ProfileName = "smoke", overrides: dict[str, Any] | None = None, force: list[str] | None = None) -> dict:
    return run_pipeline(FLOW_NAME, profile, overrides, force)
