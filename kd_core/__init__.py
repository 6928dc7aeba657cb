"""kd_core: the pure distillation library (no Prefect, no MLflow)."""

__version__ = "0.1.0"
