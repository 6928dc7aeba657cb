"""Prefect task for the prepare_task stage (logic: kd_core.stages; wiring: tasks.stages)."""

from tasks.runtime import stage_task

prepare_task = stage_task("prepare_task")
