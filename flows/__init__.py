"""Prefect flows composing the stage tasks, and the `kd` CLI."""

import os

# Set before Prefect or MLflow import: no telemetry from these machines (see DESIGN.md).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
