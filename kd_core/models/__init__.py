"""Model-side helpers: architecture adaptors, the model registry and student construction."""

from kd_core.models.adaptors import EncoderInternals, ModelAdaptor

__all__ = ["EncoderInternals", "ModelAdaptor"]
