"""Tables of docs/results.md from the runs themselves: each flow run listed in RUNS is found in
MLflow (parent run whose logged config equals the profile plus overrides), and its report's
summary.parquet and every stage manifest it depends on give the scores, speed-ups, wall-clock
and run ids. Run from the repo root: `.venv/bin/python docs/results/glue_tables.py`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flows.profiles import load_profile  # noqa: E402
from tasks.tracking import flatten  # noqa: E402

FT = {"task_distill.skip_intermediate": True, "task_distill.prediction_recipe": "finetune", "augment.enabled": False}
# (label, flow, profile, overrides); ablation step budgets equal the full recipe's task steps
RUNS = [
    ("sst2", "tinybert-full", "results-sst2", {}),
    ("mrpc", "tinybert-full", "results-mrpc", {}),
    ("stsb", "tinybert-full", "results-stsb", {}),
    ("cola", "tinybert-full", "results-cola", {}),
    ("sst2-mpnet", "tinybert-full", "results-sst2-mpnet", {}),
    ("sst2-minilm", "minilm", "results-minilm-sst2", {}),
]
ABLATIONS = [
    ("no GD", {"general_distill.enabled": False}),
    ("no TD (fine-tune the GD student)", {**FT, "task_distill.prediction.max_steps": "{total}"}),
    ("no data augmentation", {"augment.enabled": False}),
    ("logits-only KD", {"task_distill.skip_intermediate": True, "task_distill.prediction.max_steps": "{total}"}),
    ("no KD (random init, fine-tuned)", {**FT, "task_distill.prediction.max_steps": "{total}", "general_distill.enabled": False}),
    ("last-layer mapping", {"task_distill.mapping.strategy": "last"}),
]
for task in ("sst2", "mrpc"):
    base = load_profile(f"results-{task}")
    total = base.task_distill.intermediate.max_steps + base.task_distill.prediction.max_steps
    for name, overrides in ABLATIONS:
        filled = {k: (total if v == "{total}" else v) for k, v in overrides.items()}
        RUNS.append((f"{task}: {name}", "tinybert-full", f"results-{task}", filled))


def markdown_table(frame: pd.DataFrame, digits: int = 2) -> str:
    """GitHub markdown; floats rounded (tabulate, which pandas' to_markdown needs, is not a dependency)."""
    cell = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def save_tables(rows: list[dict], stages: list[dict], stem: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """<stem>_runs.parquet and <stem>_stages.parquet beside this file."""
    table, frame = pd.DataFrame(rows), pd.DataFrame(stages)
    table.to_parquet(Path(__file__).with_name(f"{stem}_runs.parquet"), index=False)
    frame.to_parquet(Path(__file__).with_name(f"{stem}_stages.parquet"), index=False)
    return table, frame


def find_parent(client, experiment_ids, flow: str, profile: str, overrides: dict):
    """The latest finished flow run whose logged config equals this profile + overrides."""
    wanted = flatten("", load_profile(profile, overrides).model_dump(mode="json"))
    runs = client.search_runs(experiment_ids, f"tags.`kd.flow` = '{flow}' and tags.`kd.profile` = '{profile}' "
                              "and attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"], max_results=200)
    for run in runs:
        if "kd.report" in run.data.tags and all(run.data.params.get(k) == v for k, v in wanted.items() if k != "force"):
            return run
    return None


def stage_tree(manifest_dir: Path, seen: dict) -> dict:
    """stage -> (seconds, mlflow run id, key) of every artifact the report depends on."""
    manifest = json.loads((manifest_dir / "manifest.json").read_text())
    seen[manifest["stage"]] = (manifest.get("seconds"), manifest.get("mlflow_run_id"), manifest["key"], manifest.get("result", {}))
    for upstream in manifest["inputs"].values():
        if upstream["stage"] not in seen:
            stage_tree(Path(upstream["path"]), seen)
    return seen


def main() -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.tracking import setup_tracking

    experiment = setup_tracking()
    client = MlflowClient()
    rows, stages = [], []
    for label, flow, profile, overrides in RUNS:
        run = find_parent(client, [experiment], flow, profile, overrides)
        if run is None:
            print(f"<!-- not run yet: {label} -->")
            continue
        report_dir = Path(run.data.tags["kd.report"])
        summary = pd.read_parquet(report_dir / "summary.parquet").set_index("model")
        teacher, student = summary.loc["teacher"], summary.loc["student"]
        rows.append({"run": label, "task": teacher.task, "teacher": load_profile(profile).teacher,
                     "teacher score": teacher.score, "student score": student.score,
                     "retention %": student.retention, "metrics": student.metrics, "teacher metrics": teacher.metrics,
                     "student params (M)": student.params / 1e6, "teacher params (M)": teacher.params / 1e6,
                     "speed-up": student.speedup, "FLOP ratio": student.flop_ratio,
                     "threads": int(teacher.threads), "mlflow parent": run.info.run_id})
        for stage, (seconds, run_id, key, result) in stage_tree(report_dir, {}).items():
            stages.append({"run": label, "stage": stage, "seconds": seconds, "mlflow run": run_id, "key": key,
                           "steps": result.get("steps") if isinstance(result, dict) else None})
    mlflow.end_run()
    table, frame = save_tables(rows, stages, "glue")
    if table.empty:
        print("no runs")
        return
    print("## Runs\n")
    print(markdown_table(table[["run", "teacher", "teacher score", "student score", "retention %", "metrics",
                                "teacher metrics", "speed-up", "FLOP ratio", "mlflow parent"]]))
    print("\n## Ablations: score and change against the full recipe\n")
    for task in ("sst2", "mrpc"):
        full = table[table.run == task]
        ablated = table[table.run.str.startswith(f"{task}: ")]
        if full.empty or ablated.empty:
            continue
        both = pd.concat([full.assign(run=f"{task}: full recipe"), ablated])
        both["change"] = both["student score"] - float(full["student score"].iloc[0])
        print(markdown_table(both[["run", "student score", "change", "retention %", "metrics", "mlflow parent"]]), "\n")
    print("## Seconds per stage, when computed (cached stages show the run that computed them)\n")
    order = [s for s in STAGE_ORDER if s in set(frame.stage)]
    pivot = frame.pivot_table(index="run", columns="stage", values="seconds", aggfunc="first")
    pivot = pivot.reindex(index=[r for r in table.run if r in pivot.index], columns=order)
    pivot.insert(0, "run", pivot.index)
    print(markdown_table(pivot.fillna("—"), 0))


STAGE_ORDER = ["prepare_corpus", "general_distill", "minilm_distill", "prepare_task", "finetune_teacher", "augment",
               "task_distill_intermediate", "task_distill_prediction", "finetune_student", "evaluate", "benchmark", "report"]


if __name__ == "__main__":
    main()
