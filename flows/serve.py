"""Serve every pipeline flow as a Prefect deployment ``<flow>/default``.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve      (``make serve`` does this)

then, from another shell with the same PREFECT_API_URL:

    prefect deployment run tinybert-full/default -p profile=smoke
    prefect deployment run tinybert-full/default -p profile=demo -p 'force=["evaluate"]'
    prefect deployment run tinybert-full/default -p 'overrides={"task.train_limit": 64}'
    prefect deployment run kd-stage/default -p stage=task_distill -p profile=demo

Flows come from ``flows.registry`` (every entry gets a deployment), plus ``kd-stage``, the
single-stage flow behind ``kd stage``. Each run executes in a subprocess of this process, with
this process's environment: MLFLOW_TRACKING_URI, KD_HOME and KD_DATA_DIR are read from it.
The same deployments for workers on the kd-cpu / kd-gpu pools are in ``prefect.yaml``.
"""

from __future__ import annotations

import argparse
import os

# Before Prefect or MLflow import (flows/__init__ sets these too; serve.py may run as a script).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DEPLOYMENT_NAME = "default"
EXTRA_FLOWS = {"kd-stage": ("flows.single_stage", "single_stage")}


def served_flows(include_extra: bool = True) -> dict:
    """``{flow name: Flow}``: every flow in flows.registry, then the single-stage flow."""
    from importlib import import_module

    from flows.registry import all_flows

    flows = dict(all_flows())
    if include_extra:
        for name, (module, attr) in EXTRA_FLOWS.items():
            flows.setdefault(name, getattr(import_module(module), attr))
    return flows


def deployment_names(include_extra: bool = True) -> list[str]:
    """``<flow>/default`` for each served flow, without importing the flows."""
    from flows.registry import FLOWS

    names = list(FLOWS) + ([n for n in EXTRA_FLOWS if n not in FLOWS] if include_extra else [])
    return [f"{name}/{DEPLOYMENT_NAME}" for name in names]


def build_deployments(include_extra: bool = True) -> list:
    from prefect.deployments.runner import EntrypointType

    deployments = []
    for name, flow in served_flows(include_extra).items():
        if flow.name != name:
            raise ValueError(f"flows.registry maps {name!r} to a flow named {flow.name!r}; they must match")
        deployments.append(
            flow.to_deployment(
                name=DEPLOYMENT_NAME,
                tags=["kd-pipeline", name],
                description=(flow.description or "").strip() or None,
                # a module path, so the recorded entrypoint works wherever kd-pipeline is installed
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return deployments


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=int(os.environ.get("KD_SERVE_LIMIT", "0")) or None,
                        help="most flow runs at once (default: no limit; env KD_SERVE_LIMIT)")
    parser.add_argument("--no-extra", action="store_true", help="serve only the flows.registry flows, not kd-stage")
    args = parser.parse_args(argv)

    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise SystemExit(
                "PREFECT_API_URL is not set: start a server (make serve, or prefect server start) and "
                "export PREFECT_API_URL=http://127.0.0.1:4200/api; an ephemeral API would die with this process"
            )

    from prefect import serve

    from tasks.tracking import tracking_uri

    deployments = build_deployments(include_extra=not args.no_extra)
    print(f"serving {', '.join(f'{d.flow_name}/{d.name}' for d in deployments)}", flush=True)
    print(f"MLflow tracking: {tracking_uri()}", flush=True)
    serve(*deployments, limit=args.limit)


if __name__ == "__main__":
    main()
