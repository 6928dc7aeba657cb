"""Run one training stage as DDP: `torchrun --nproc_per_node N -m tasks.launch SPEC.json`.

tasks.runtime starts this when KD_STAGE_PROCESSES > 1. Every rank runs the same stage function
(the trainer is accelerate-based, so it becomes DDP under torchrun); rank 0 writes the outputs,
logs the per-step losses to the stage's MLflow run and leaves the result for the parent.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from kd_core.config import PipelineConfig
from kd_core.stages.common import StageIO
from tasks.stages import dag_for


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    cfg = PipelineConfig.model_validate(spec["config"])
    stage = dag_for(spec["flow"], cfg)[spec["stage"]]
    rank = int(os.environ.get("RANK", "0"))
    callbacks = []
    if rank == 0 and spec.get("mlflow_run_id"):
        from tasks.tracking import StepMetricsLogger

        callbacks.append(StepMetricsLogger(spec["mlflow_run_id"]))
    io = StageIO(inputs={role: Path(path) for role, path in spec["inputs"].items()}, out=Path(spec["out"]),
                 work=Path(spec["work"]), callbacks=callbacks)
    result = stage.run(cfg, io)
    if rank == 0:
        for callback in callbacks:
            callback.flush()
        Path(spec["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
