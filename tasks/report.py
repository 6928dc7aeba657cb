"""Prefect task for the report stage (logic: kd_core.stages; wiring: tasks.stages)."""

from tasks.runtime import stage_task

report = stage_task("report")
