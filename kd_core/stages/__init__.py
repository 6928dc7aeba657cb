"""The pipeline's stages as pure functions, one module per family of flows:

* :mod:`kd_core.stages.common` - the stage contract (``fn(cfg, io) -> dict``, :class:`StageIO`)
  and the helpers every stage module shares;
* :mod:`kd_core.stages.glue` - tinybert-full and minilm;
* :mod:`kd_core.stages.qa` - squad-distill;
* :mod:`kd_core.stages.metakd` - meta-kd.

The graphs that wire them live in ``tasks/graph.py`` and its per-flow tables.
"""
