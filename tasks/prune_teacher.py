"""Prefect task for the prune_teacher stage (logic: kd_core.stages; wiring: tasks.stages)."""

from tasks.runtime import stage_task

prune_teacher = stage_task("prune_teacher")
