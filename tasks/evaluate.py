"""Prefect task for the evaluate stage (logic: kd_core.stages; wiring: tasks.stages)."""

from tasks.runtime import stage_task

evaluate = stage_task("evaluate")
