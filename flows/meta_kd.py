"""meta-kd: Meta-KD across the Amazon review domains (Pan et al., 2021).

This flow holds the per-domain part of the recipe: each domain's data, a teacher fine-tuned on
that domain alone (the single-domain baseline's teacher) and its dev score, in one report. The
meta-teacher and meta-distillation stages are added by the Meta-KD issue.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.run import pipeline_run, summarize
from tasks.runtime import stage_task

FLOW_NAME = "meta-kd"


@flow(name=FLOW_NAME, log_prints=True)
def meta_kd(profile: str = "smoke", overrides: dict[str, Any] | None = None, force: list[str] | None = None) -> dict:
    with pipeline_run(FLOW_NAME, profile, overrides, force) as (ctx, cfg):
        evaluations = []
        for domain in cfg.meta_kd.domains:
            task_data = stage_task(f"prepare_task@{domain}").submit(ctx, cfg)
            teacher = stage_task(f"finetune_teacher@{domain}").submit(ctx, cfg, task_data)
            evaluations.append(stage_task(f"evaluate@{domain}").submit(ctx, cfg, teacher, task_data))
        return summarize(ctx, stage_task("report").submit(ctx, cfg, *evaluations).result())
