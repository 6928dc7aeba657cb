"""Prefect task for the finetune_student stage (logic: kd_core.stages; wiring: tasks.stages)."""

from tasks.runtime import stage_task

finetune_student = stage_task("finetune_student")
