"""Model-side helpers: architecture adaptors, the model registry and student construction.

The adaptors import torch; they load on first use, so ``kd_core.models.registry`` (paths, the
model table) stays light for a run whose every stage is cached.
"""

__all__ = ["EncoderInternals", "ModelAdaptor"]


def __getattr__(name: str):
    if name in __all__:
        from kd_core.models import adaptors

        return getattr(adaptors, name)
    raise AttributeError(f"module 'kd_core.models' has no attribute {name!r}")
