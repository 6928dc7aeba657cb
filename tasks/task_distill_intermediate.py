"""Prefect task for the task_distill_intermediate stage (logic: kd_core.stages; wiring: tasks.stages)."""

from tasks.runtime import stage_task

task_distill_intermediate = stage_task("task_distill_intermediate")
