"""Prefect task for the task_distill_prediction stage (logic: kd_core.stages; wiring: tasks.stages)."""

from tasks.runtime import stage_task

task_distill_prediction = stage_task("task_distill_prediction")
