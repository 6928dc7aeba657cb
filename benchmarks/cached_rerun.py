"""Wall time of a fully cached `kd run` (issue 14.11: target <= 8 s for the demo profile).

Runs the same cached command alternately in two ways, so both numbers come from the same
minutes of this noisy machine:
- `shipped`: the `kd` console script as installed (its own ephemeral Prefect server spawned
  before the heavy imports, exit without interpreter teardown);
- `prefect-own`: Prefect's own ephemeral server (KD_PREFECT_EARLY_SERVER=0), started when the
  flow is called, and the interpreter's normal exit (`python -c "from flows.cli import app; app()"`).
Both run on today's code, so neither imports torch for a cached run; the numbers of the code
before this work are in benchmarks/cached_rerun.md.

    .venv/bin/python benchmarks/cached_rerun.py --profile demo --repeats 5

The first call computes whatever is not cached yet and is not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def run(mode: str, profile: str) -> tuple[float, str]:
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    if mode == "shipped":
        command = [str(BIN / "kd"), "run", "tinybert-full", "--profile", profile]
    else:
        env["KD_PREFECT_EARLY_SERVER"] = "0"
        command = [sys.executable, "-c", "from flows.cli import app; app()", "run", "tinybert-full", "--profile", profile]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return elapsed, result.stdout + result.stderr


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    run("shipped", args.profile)  # computes what is missing; not timed
    times: dict[str, list[float]] = {"shipped": [], "prefect-own": []}
    for repeat in range(args.repeats):
        for mode in (("shipped", "prefect-own") if repeat % 2 == 0 else ("prefect-own", "shipped")):
            elapsed, output = run(mode, args.profile)
            cached = output.count("Finished in state Cached")
            computed = [line for line in output.splitlines() if "Task run" in line and "Finished in state Completed()" in line]
            if cached == 0 or computed:
                raise SystemExit(f"{mode}: not a fully cached run:\n{output[-3000:]}")
            times[mode].append(elapsed)
            print(f"{mode:12s} run {repeat + 1}: {elapsed:5.2f} s ({cached} stages Cached)", flush=True)
    print()
    print("| mode | median (s) | min (s) | max (s) | runs |")
    print("|---|---|---|---|---|")
    for mode, values in times.items():
        print(f"| {mode} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} | {len(values)} |")
    ratio = statistics.median(times["prefect-own"]) / statistics.median(times["shipped"])
    print(f"\nprefect-own / shipped, medians: {ratio:.2f}x")


if __name__ == "__main__":
    main()
