"""What Prefect and MLflow add to a flow's stage time.

Runs one profile twice, each in a fresh KD_HOME, one after the other:
  direct: every kd_core stage function in topological order, written through the artifact
          store (keys, digests, manifests), no Prefect and no MLflow;
  flow:   the tinybert-full Prefect flow (tasks one at a time, like `direct`) with MLflow
          tracking, per-step loss logging and model registration.
Both compute the same stages from scratch. Two measures of the orchestration overhead:
  in-run:  flow wall time minus the time its stages spent producing their artifacts (each
           manifest's `seconds`), both from the same run, so machine noise mostly cancels;
  paired:  flow wall time minus direct wall time, from two runs (noisy on a shared machine).

    .venv/bin/python benchmarks/pipeline_overhead.py --profile demo
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Import every module both halves use now: editing the tree during a 25-minute run must not mix
# code versions between the halves.
import flows.tinybert_full  # noqa: E402,F401
import kd_core.augment  # noqa: E402,F401
import kd_core.data.corpus  # noqa: E402,F401
import kd_core.data.loaders  # noqa: E402,F401
import kd_core.data.tasks  # noqa: E402,F401
import kd_core.evaluate.glue  # noqa: E402,F401
import kd_core.stages.glue  # noqa: E402,F401
import tasks.stages  # noqa: E402,F401


def run_direct(profile: str) -> tuple[float, dict[str, float]]:
    from flows.profiles import load_profile
    from kd_core.artifacts import ArtifactStore
    from kd_core.models.registry import kd_home
    from kd_core.stages.common import StageIO
    from tasks.stages import dag_for

    cfg = load_profile(profile)
    store = ArtifactStore(kd_home() / "artifacts")
    done, seconds = {}, {}
    started = time.perf_counter()
    for name, stage in dag_for("tinybert-full", cfg).items():  # listed in topological order
        inputs = {role: done[node] for role, node in stage.inputs.items()}
        key = store.stage_key(name, stage.section(cfg), inputs, code=stage.code)
        t0 = time.perf_counter()
        io = lambda out: StageIO({role: a.path for role, a in inputs.items()}, out, store.work_dir(name, key))  # noqa: E731
        done[name] = store.write(name, key, lambda out: stage.run(cfg, io(out)), config=stage.section(cfg), inputs=inputs)
        seconds[name] = time.perf_counter() - t0
    return time.perf_counter() - started, seconds


def run_flow(profile: str) -> float:
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.tinybert_full import tinybert_full

    sequential = tinybert_full.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))
    started = time.perf_counter()
    state = sequential(profile=profile, return_state=True)
    elapsed = time.perf_counter() - started
    if not state.is_completed():
        raise SystemExit(f"flow failed: {state}")
    return elapsed


def stage_seconds(kd_home: Path) -> dict[str, float]:
    import json

    found = {}
    for manifest in sorted((kd_home / "artifacts").glob("*/*/manifest.json")):
        data = json.loads(manifest.read_text())
        found[data["stage"]] = data["seconds"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="demo")
    args = parser.parse_args()
    results = {}
    for mode in ("direct", "flow"):
        os.environ["KD_HOME"] = tempfile.mkdtemp(prefix=f"kd-overhead-{mode}-")
        # both runs share the reassembled/tiny models dir, so neither pays for building it
        if mode == "direct":
            results[mode], per_stage = run_direct(args.profile)
        else:
            results[mode] = run_flow(args.profile)
            in_flow = stage_seconds(Path(os.environ["KD_HOME"]))
        print(f"{mode}: {results[mode]:.1f} s", flush=True)
    print("| stage | direct run (s) | inside the flow (s) |\n|---|---|---|")
    for name, value in per_stage.items():
        print(f"| {name} | {value:.1f} | {in_flow.get(name, float('nan')):.1f} |")
    produce = sum(in_flow.values())
    in_run = results["flow"] - produce
    paired = results["flow"] - results["direct"]
    print("\n| profile | stage time in the flow (s) | flow wall (s) | in-run overhead (s) | in-run % | direct wall (s) "
          "| paired overhead % |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.profile} | {produce:.1f} | {results['flow']:.1f} | {in_run:.1f} | {100 * in_run / produce:.1f} | "
          f"{results['direct']:.1f} | {100 * paired / results['direct']:.1f} |")


if __name__ == "__main__":
    main()
