"""Prefect task for the assistant_distill stage (MiniLM's teacher assistant)."""

from tasks.runtime import stage_task

assistant_distill = stage_task("assistant_distill")
