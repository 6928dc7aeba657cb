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


def get_flow(name: str):
    if name not in FLOWS:
        raise ValueError(f"unknown flow {name!r}; flows: {', '.join(FLOWS)}")
    module, attr = FLOWS[name]
    return getattr(import_module(module), attr)


def all_flows() -> dict:
    """Every pipeline flow, ``{deployment flow name: Flow}``."""
    return {name: get_flow(name) for name in FLOWS}
