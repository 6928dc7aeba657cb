"""Score a profile's fine-tuned teacher on the rows held out from train (task.holdout_rows), to
choose the teacher's budget without looking at dev.

    .venv/bin/python docs/results/teacher_holdout.py results-cola -p finetune_teacher.train.max_steps=800

Prints one line: the profile, the overrides, the teacher's artifact key and its holdout metrics.
The teacher must be in the store already (kd stage finetune_teacher --profile ... -p ...).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from flows.profiles import load_profile
from flows.single_stage import resolve_inputs
from kd_core.config import parse_override
from kd_core.models.registry import kd_home
from kd_core.stages.glue import evaluate_models
from tasks.runtime import RunContext, stage_key


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("profile")
    parser.add_argument("-p", "--param", action="append", default=[])
    args = parser.parse_args()
    overrides = dict(parse_override(p) for p in args.param)
    cfg = load_profile(args.profile, {**overrides, "task.eval_split": "holdout"})
    ctx = RunContext(str(kd_home()), "tinybert-full")
    inputs = resolve_inputs(ctx, cfg, "finetune_teacher")
    key = stage_key(ctx, cfg, "finetune_teacher", inputs)
    teacher = ctx.store.get("finetune_teacher", key)
    if teacher is None:
        raise SystemExit(f"no finetune_teacher artifact {key}; run: kd stage finetune_teacher --profile {args.profile} "
                         + " ".join(f"-p {p}" for p in args.param))
    with tempfile.TemporaryDirectory() as out:
        result = evaluate_models(cfg, {"teacher": teacher.path}, inputs["task"].path, Path(out))
    print(json.dumps({"profile": args.profile, "overrides": overrides, "teacher_key": key, "holdout": result}))


if __name__ == "__main__":
    main()
