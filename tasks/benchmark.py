"""Prefect task for the benchmark stage (logic: kd_core.stages; wiring: tasks.stages)."""

from tasks.runtime import stage_task

benchmark = stage_task("benchmark")
