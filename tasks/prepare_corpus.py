"""Prefect task for the prepare_corpus stage (logic: kd_core.stages; wiring: tasks.stages)."""

from tasks.runtime import stage_task

prepare_corpus = stage_task("prepare_corpus")
