"""Prefect task for the export stage (logic: kd_core.stages and kd_core.export; wiring: tasks.stages)."""

from tasks.runtime import stage_task

export = stage_task("export")
