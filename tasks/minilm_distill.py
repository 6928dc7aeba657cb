"""Prefect task for the minilm_distill stage (logic: kd_core.stages; wiring: tasks.stages)."""

from tasks.runtime import stage_task

minilm_distill = stage_task("minilm_distill")
