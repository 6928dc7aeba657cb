"""Flows by deployment name.

``FLOWS`` is the one list of pipeline flows: ``kd run <name>``, ``flows/serve.py`` (which serves
``<name>/default`` for each) and the tests all iterate it. Add a flow here as
``"name": ("module", "function")``; modules are imported lazily.
"""

from __future__ import annotations

from importlib import import_module

FLOWS: dict[str, tuple[str, str]] = {
    "tinybert-full": ("flows.tinybert_full", "tinybert_full"),
    "minilm": ("flows.minilm", "minilm"),
    "meta-kd": ("flows.meta_kd", "meta_kd"),
    "squad-distill": ("flows.squad", "squad_distill"),
}

# Flow names, in order (serve.py, prefect.yaml and the tests use these).
FLOW_NAMES: tuple[str, ...] = tuple(FLOWS)

# Every stage name a flow's graph can hold, in graph order, for `kd stage --help` without
# importing torch (tasks/stages.py builds the graphs). Which of them a run has depends on its
# config (prune_teacher replaces prepare_corpus and general_distill for
# student.init=pruned, student.prune.source=finetuned; export runs with export.enabled); meta-kd's per-domain nodes are
# `<stage>@<domain>/...`. tests/test_cli.py checks this table against the graphs.
STAGE_NAMES: dict[str, tuple[str, ...]] = {
    "tinybert-full": ("prepare_corpus", "general_distill", "prepare_task", "finetune_teacher", "prune_teacher",
                      "augment", "task_distill_intermediate", "task_distill_prediction", "evaluate", "benchmark", "report", "export"),
    "minilm": ("prepare_corpus", "assistant_distill", "minilm_distill", "prepare_task", "finetune_teacher",
               "finetune_student", "evaluate", "benchmark", "report", "export"),
    "meta-kd": ("prepare_task", "encode_domains", "finetune_teacher", "meta_teacher", "finetune_mixed",
                "meta_distill", "distill_single", "distill_mixed", "evaluate_teachers", "evaluate", "report"),
    "squad-distill": ("prepare_corpus", "general_distill", "prepare_qa", "finetune_teacher_qa",
                      "task_distill_qa_intermediate", "task_distill_qa_prediction", "evaluate_qa", "benchmark", "report"),
}


def get_flow(name: str):
    if name not in FLOWS:
        raise ValueError(f"unknown flow {name!r}; flows: {', '.join(FLOWS)}")
    module, attr = FLOWS[name]
    return getattr(import_module(module), attr)


def all_flows() -> dict:
    """Every pipeline flow, ``{deployment flow name: Flow}``."""
    return {name: get_flow(name) for name in FLOWS}
