"""Prefect task for the general_distill stage (logic: kd_core.stages; wiring: tasks.stages)."""

from tasks.runtime import stage_task

general_distill = stage_task("general_distill")
