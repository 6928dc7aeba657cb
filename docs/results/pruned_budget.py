"""docs/results.md, "The prediction-step budget, chosen on the holdout" (issue 12, second session).

The pruned-from-fine-tuned path skips general distillation (829 s on these profiles), so it may
spend up to that on task steps and still cost no more than the random-init row. Candidates per
task (each task's augmentation choice, pruned_choices.json): the profile's prediction step
(200 steps at 1e-4, scored in the first session), 600 steps at 1e-4 and 600 at 3e-4; CoLA, whose
steps are cheap, also 1,200 at 3e-4. The best holdout score wins (ties: the cheaper); only the
winner is evaluated on dev. Run from the repo root with the KD_HOME of the runs:

    KD_HOME=/path/to/store .venv/bin/python docs/results/pruned_budget.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from glue_tables import find_parent, markdown_table, save_tables, stage_tree  # noqa: E402
from pruned_tables import PRUNED_FT  # noqa: E402

CANDIDATES = {
    "stsb": [(600, 1.0e-4), (600, 3.0e-4)],
    "cola": [(600, 1.0e-4), (600, 3.0e-4), (1200, 3.0e-4)],
    "mrpc": [(600, 1.0e-4), (600, 3.0e-4)],
}  # SST-2 was not rerun (session time); its row stays at the profile's budget


def overrides(task: str, choices: dict, steps: int, lr: float, split: str) -> dict:
    return {**PRUNED_FT, **choices.get("teacher", {}).get(task, {}), "augment.enabled": choices["augment"][task],
            "task_distill.prediction.max_steps": steps, "task_distill.prediction.learning_rate": lr,
            "task.eval_split": split}


def main() -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.tracking import setup_tracking

    here = Path(__file__).parent
    choices = json.loads((here / "pruned_choices.json").read_text())
    earlier = pd.read_parquet(here / "pruned_runs.parquet")  # the first session's rows (profile budget)
    experiment = setup_tracking()
    client = MlflowClient()
    rows, stages = [], []
    for task, candidates in CANDIDATES.items():
        aug = "augmented" if choices["augment"][task] else "no augmentation"
        first = earlier[(earlier.task == task) & (earlier.init == f"pruned from fine-tuned + TD, {aug}")]
        if len(first):
            rows.append({"task": task, "prediction step": "200 at 1e-4 (profile)", "holdout teacher": first.iloc[0]["holdout teacher"],
                         "holdout student": first.iloc[0]["holdout student"], "dev teacher": first.iloc[0]["dev teacher"],
                         "dev student": first.iloc[0]["dev student"], "retention %": first.iloc[0]["retention %"],
                         "mlflow parent": first.iloc[0]["mlflow parent (dev)"]})
        for steps, lr in candidates:
            found = {}
            for split in ("holdout", "dev"):
                run = find_parent(client, [experiment], "tinybert-full", f"results-{task}", overrides(task, choices, steps, lr, split))
                if run is not None:
                    found[split] = (run, pd.read_parquet(Path(run.data.tags["kd.report"]) / "summary.parquet").set_index("model"))
            if "holdout" not in found:
                print(f"<!-- not run: {task} {steps} at {lr:g} -->")
                continue
            holdout = found["holdout"][1]
            dev_run, dev = found.get("dev", (None, None))
            rows.append({"task": task, "prediction step": f"{steps} at {lr:g}",
                         "holdout teacher": holdout.loc["teacher"].score, "holdout student": holdout.loc["student"].score,
                         "dev teacher": dev.loc["teacher"].score if dev is not None else float("nan"),
                         "dev student": dev.loc["student"].score if dev is not None else float("nan"),
                         "retention %": dev.loc["student"].retention if dev is not None else float("nan"),
                         "mlflow parent": (dev_run or found["holdout"][0]).info.run_id})
            run = found["holdout"][0]
            for stage, (seconds, _, key, _) in stage_tree(Path(run.data.tags["kd.report"]), {}).items():
                stages.append({"task": task, "candidate": f"{steps} at {lr:g}", "stage": stage, "seconds": seconds, "key": key})
    mlflow.end_run()
    table, frame = save_tables(rows, stages, "pruned_budget")
    print(markdown_table(table))
    if not frame.empty:
        print("\n## Seconds per stage (holdout runs; shared stages were computed once)\n")
        frame["run"] = frame.task + ": " + frame.candidate
        pivot = frame.pivot_table(index="run", columns="stage", values="seconds", aggfunc="first")
        pivot.insert(0, "run", pivot.index)
        print(markdown_table(pivot.fillna("—"), 0))


if __name__ == "__main__":
    main()
