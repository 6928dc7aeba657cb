"""Prefect task for the augment stage (logic: kd_core.stages; wiring: tasks.stages)."""

from tasks.runtime import stage_task

augment = stage_task("augment")
