"""tinybert-full: general distillation, teacher fine-tuning, augmentation, task distillation
(intermediate then prediction layer), evaluation, benchmark and report (graph: tasks/glue_dag.py)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.profiles import ProfileName
from flows.run import pipeline_parameters_doc, run_pipeline

FLOW_NAME = "tinybert-full"
DESCRIPTION = "TinyBERT end to end: general + task distillation with augmentation, evaluation, benchmark, report."


@flow(name=FLOW_NAME, description=DESCRIPTION, log_prints=True)
@pipeline_parameters_doc
def tinybert_full(profile: ProfileName = "smoke", overrides: dict[str, Any] | None = None, force: list[str] | None = None) -> dict:
    return run_pipeline(FLOW_NAME, profile, overrides, force)
