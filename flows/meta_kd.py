"""meta-kd: Meta-KD across the Amazon review domains (Pan et al., ACL 2021).

One run trains and evaluates, on each target domain's dev split and for every training fraction
and seed of ``meta_kd``: (a) a student of the single-domain teacher, (b) a student of a teacher
fine-tuned on all domains mixed, (c) Meta-KD (meta-teacher, then meta-distillation), and the
three teachers themselves; the report holds the per-domain and few-shot tables (stage table:
tasks/metakd_dag.py). Nodes are cached one by one, so adding a seed or a fraction trains only the
new ones.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.profiles import ProfileName
from flows.run import pipeline_parameters_doc, run_pipeline

FLOW_NAME = "meta-kd"


# A few threads: training stages take one slot anyway, and a hundred waiting task threads would
# only load the Prefect API. Submission order is topological, so no task waits on a queued one.
DESCRIPTION = "Meta-KD across the Amazon review domains: per-domain data, single-domain teachers, per-domain report."


@flow(name=FLOW_NAME, description=DESCRIPTION, log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=3))
@pipeline_parameters_doc
def meta_kd(profile: ProfileName = "smoke", overrides: dict[str, Any] | None = None, force: list[str] | None = None) -> dict:
    return run_pipeline(FLOW_NAME, profile, overrides, force)
