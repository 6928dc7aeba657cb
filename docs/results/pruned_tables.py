"""docs/results.md, "Students built from the teacher": the rows of issue 12 read back from the runs.

Each row is a tinybert-full run of a results profile plus the overrides below, evaluated twice:
on the rows held out from train (`task.eval_split=holdout`, where choices were made) and on dev
(reported). The choices made on the holdout (augmentation per task, CoLA's teacher budget) are in
pruned_choices.json beside this file. Run from the repo root with the KD_HOME of the runs:

    KD_HOME=/path/to/store .venv/bin/python docs/results/pruned_tables.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from glue_tables import find_parent, markdown_table, save_tables, stage_tree  # noqa: E402

PRUNED_FT = {"student.init": "pruned", "student.prune.source": "finetuned", "task_distill.mapping.strategy": "student_init"}
PRUNED_GD = {"student.init": "pruned", "general_distill.mapping.strategy": "student_init",
             "task_distill.mapping.strategy": "student_init"}
LAYER_COPY = {"student.init": "teacher_layers", "student.hidden_size": 384, "student.intermediate_size": 1536,
              "general_distill.enabled": False, "task_distill.mapping.strategy": "student_init"}
TASKS = ("sst2", "mrpc", "stsb", "cola")


def rows_for(task: str, choices: dict) -> list[tuple[str, dict]]:
    teacher = choices.get("teacher", {}).get(task, {})
    aug = {"augment.enabled": choices["augment"][task]} if task in choices.get("augment", {}) else {}
    return [
        ("pruned from fine-tuned + TD, augmented", {**PRUNED_FT, **teacher}),
        ("pruned from fine-tuned + TD, no augmentation", {**PRUNED_FT, **teacher, "augment.enabled": False}),
        ("pruned + GD + TD", {**PRUNED_GD, **teacher, **aug}),
        ("teacher-layer copy 4x384 + TD (no GD)", {**LAYER_COPY, **teacher, **aug}),
    ]


def main() -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.tracking import setup_tracking

    choices = json.loads(Path(__file__).with_name("pruned_choices.json").read_text())
    experiment = setup_tracking()
    client = MlflowClient()
    rows, stages = [], []
    for task in TASKS:
        for label, overrides in rows_for(task, choices):
            found = {}
            for split in ("holdout", "dev"):
                run = find_parent(client, [experiment], "tinybert-full", f"results-{task}", {**overrides, "task.eval_split": split})
                if run is not None:
                    found[split] = (run, pd.read_parquet(Path(run.data.tags["kd.report"]) / "summary.parquet").set_index("model"))
            if "dev" not in found:
                print(f"<!-- not run: {task} / {label} -->")
                continue
            run, summary = found["dev"]
            teacher, student = summary.loc["teacher"], summary.loc["student"]
            holdout = found.get("holdout", (None, None))[1]
            rows.append({"task": task, "init": label,
                         "holdout teacher": holdout.loc["teacher"].score if holdout is not None else float("nan"),
                         "holdout student": holdout.loc["student"].score if holdout is not None else float("nan"),
                         "dev teacher": teacher.score, "dev student": student.score, "retention %": student.retention,
                         "student metrics": student.metrics, "params (M)": student.params / 1e6,
                         "speed-up": student.speedup, "FLOP ratio": student.flop_ratio,
                         "% of FLOP ratio": 100 * student.speedup / student.flop_ratio,
                         "mlflow parent (dev)": run.info.run_id})
            for stage, (seconds, run_id, key, result) in stage_tree(Path(run.data.tags["kd.report"]), {}).items():
                stages.append({"task": task, "init": label, "stage": stage, "seconds": seconds, "key": key})
    mlflow.end_run()
    table, frame = save_tables(rows, stages, "pruned")
    if table.empty:
        print("no runs")
        return
    print(markdown_table(table))
    print("\n## Seconds per stage, when computed\n")
    order = ["prepare_corpus", "general_distill", "prepare_task", "finetune_teacher", "prune_teacher", "augment",
             "task_distill_intermediate", "task_distill_prediction", "evaluate", "benchmark", "report"]
    frame["run"] = frame.task + ": " + frame.init
    pivot = frame.pivot_table(index="run", columns="stage", values="seconds", aggfunc="first")
    pivot = pivot.reindex(columns=[s for s in order if s in pivot.columns])
    pivot.insert(0, "run", pivot.index)
    print(markdown_table(pivot.fillna("—"), 0))


if __name__ == "__main__":
    main()
