"""Prefect task for the finetune_teacher stage (logic: kd_core.stages; wiring: tasks.stages)."""

from tasks.runtime import stage_task

finetune_teacher = stage_task("finetune_teacher")
