"""The tinybert-full flow on the smoke profile, in a temp KD_HOME, with a real MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

STAGE_NAMES = [
    "prepare_corpus", "general_distill", "prepare_task", "finetune_teacher", "augment",
    "task_distill_intermediate", "task_distill_prediction", "evaluate", "benchmark", "report",
]


@pytest.fixture(scope="module")
def kd_home(tmp_path_factory, kd_data_dir):
    home = tmp_path_factory.mktemp("kd_home")
    saved = {k: os.environ.get(k) for k in ("KD_HOME", "KD_DATA_DIR", "MLFLOW_TRACKING_URI")}
    os.environ["KD_HOME"] = str(home)
    os.environ["KD_DATA_DIR"] = str(kd_data_dir)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def run_flow(**kwargs):
    from flows.tinybert_full import tinybert_full

    started = time.perf_counter()
    state = tinybert_full(profile="smoke", return_state=True, **kwargs)
    elapsed = time.perf_counter() - started
    assert state.is_completed(), state
    return state.result(), elapsed, str(state.state_details.flow_run_id)


def stage_states(flow_run_id: str, wait_s: float = 30.0) -> dict[str, str]:
    """Task-run state names of a flow run, from Prefect's own records. Prefect records task-run
    states asynchronously: on a loaded machine a finished run's tasks can still read Pending (or
    have no state) for a few seconds, so poll until every state is final."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def fetch():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            # task runs are named after their stage, with no random suffix (tasks/runtime.py)
            return {run.name: (run.state.name if run.state else None, run.state.is_final() if run.state else False)
                    for run in runs}

    deadline = time.monotonic() + wait_s
    while True:
        states = asyncio.run(fetch())
        if all(final for _, final in states.values()) or time.monotonic() > deadline:
            return {name: state for name, (state, _) in states.items()}
        time.sleep(0.5)


def artifacts(home: Path, stage: str) -> list[Path]:
    root = home / "artifacts" / stage
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


FIRST_FLOW_RUN: dict[str, str] = {}


@pytest.fixture(scope="module")
def first_run(kd_home):
    result, elapsed, flow_run_id = run_flow()
    FIRST_FLOW_RUN["id"] = flow_run_id
    return result, elapsed


def test_full_smoke_run_writes_every_stage(first_run, kd_home):
    result, elapsed = first_run
    for stage in STAGE_NAMES:
        found = artifacts(kd_home, stage)
        assert len(found) == 1, stage
        manifest = json.loads((found[0] / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["digest"]
    report = Path(result["report"]).read_text()
    assert "| teacher |" in report and "| student |" in report
    student_dir = artifacts(kd_home, "task_distill_prediction")[0] / "model"
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(student_dir)
    assert student.config.num_hidden_layers == 2 and student.config.num_labels == 2
    # evaluation really scored the dev rows: accuracy is a multiple of 1/128
    metrics = pd.read_parquet(artifacts(kd_home, "evaluate")[0] / "metrics.parquet").set_index("model")
    assert metrics.loc["teacher", "rows"] == 128
    assert abs(metrics.loc["teacher", "accuracy"] * 128 / 100 - round(metrics.loc["teacher", "accuracy"] * 128 / 100)) < 1e-6


def test_rerun_is_all_cached_and_fast(first_run, kd_home):
    _, first_elapsed = first_run
    _, elapsed, flow_run_id = run_flow()
    # A cached rerun still pays ~1 s of Prefect + MLflow bookkeeping, and the smoke flow's first run
    # takes 10-40 s depending on the machine's load, so the margin is 4x, not 10x (10x failed once
    # at 10.5 s vs 1.07 s). Recomputing anything would cost about the first run again.
    assert elapsed * 4 < first_elapsed, (elapsed, first_elapsed)
    assert stage_states(flow_run_id) == {stage: "Cached" for stage in STAGE_NAMES}
    for stage in STAGE_NAMES:
        assert len(artifacts(kd_home, stage)) == 1, stage


def test_force_reruns_exactly_that_stage(first_run, kd_home):
    before = {s: [p.stat().st_mtime_ns for p in artifacts(kd_home, s)] for s in STAGE_NAMES}
    run_flow(force=["evaluate"])
    after = {s: [p.stat().st_mtime_ns for p in artifacts(kd_home, s)] for s in STAGE_NAMES}
    changed = {s for s in STAGE_NAMES if before[s] != after[s]}
    assert changed == {"evaluate"}  # same inputs give the same metrics, so report stays cached


def test_deleted_artifact_is_recomputed(first_run, kd_home):
    (victim,) = artifacts(kd_home, "augment")
    digest = json.loads((victim / "manifest.json").read_text())["digest"]
    shutil.rmtree(victim)
    run_flow()
    (again,) = artifacts(kd_home, "augment")
    assert json.loads((again / "manifest.json").read_text())["digest"] == digest  # deterministic


def test_edited_artifact_is_detected_and_recomputed(first_run, kd_home):
    (victim,) = artifacts(kd_home, "prepare_task")
    rows = victim / "train.parquet"
    frame = pd.read_parquet(rows)
    frame.loc[0, "text_a"] = "tampered " + frame.loc[0, "text_a"]
    frame.to_parquet(rows, index=False)
    run_flow()
    quarantined = list((kd_home / "artifacts" / ".corrupt").glob("prepare_task-*"))
    assert quarantined, "the edited artifact was not detected"
    (again,) = artifacts(kd_home, "prepare_task")
    assert "tampered" not in pd.read_parquet(again / "train.parquet").loc[0, "text_a"]


def test_mlflow_holds_parent_nested_runs_and_registered_models(first_run, kd_home):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{kd_home / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("kd-pipeline")
    runs = client.search_runs([experiment.experiment_id], max_results=500)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("kd.flow") == "tinybert-full"]
    first_parent = min(parents, key=lambda r: r.info.start_time)
    assert first_parent.data.tags.get("prefect.flow_run_id")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first_parent.info.run_id]
    assert {r.data.tags["kd.stage"] for r in children} == set(STAGE_NAMES)
    general = next(r for r in children if r.data.tags["kd.stage"] == "general_distill")
    history = client.get_metric_history(general.info.run_id, "loss")
    assert [m.step for m in history] == list(range(1, 65))
    import re

    terms = [k for k in general.data.metrics if k.startswith("loss/")]
    assert any(k.startswith("loss/attention_scores/s") for k in terms)
    # readable: loss/<feature>[/s<student layer>_t<teacher layer>]/<loss>, no escaped brackets
    assert all(re.fullmatch(r"loss/[a-z_]+(/s-?\d+_t-?\d+)?/[a-z_]+", k) for k in terms), terms
    evaluation = next(r for r in children if r.data.tags["kd.stage"] == "evaluate")
    assert "student_score" in evaluation.data.metrics
    (version,) = client.search_model_versions("name = 'tinybert-full-smoke-sst2-student'")
    assert version.run_id == next(r for r in children if r.data.tags["kd.stage"] == "task_distill_prediction").info.run_id


def test_registered_models_keep_profiles_apart_and_one_version_per_key(first_run, kd_home):
    """Issue 14.2: <flow>-<profile>-<task>-<role>; tags with key, task, score, retention, params,
    speed-up; the report sets alias best; a forced recompute of the same key adds no version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{kd_home / 'mlflow.db'}")
    client = MlflowClient()
    names = {m.name for m in client.search_registered_models()}
    assert {"tinybert-full-smoke-sst2-teacher", "tinybert-full-smoke-sst2-general-student",
            "tinybert-full-smoke-sst2-student"} <= names
    (student,) = artifacts(kd_home, "task_distill_prediction")
    run_flow(force=["task_distill_prediction"])  # the same key computed again
    versions = client.search_model_versions("name = 'tinybert-full-smoke-sst2-student'")
    assert len(versions) == 1
    version = versions[0]
    summary = pd.read_parquet(artifacts(kd_home, "report")[0] / "summary.parquet").set_index("model")
    assert version.tags["kd.key"] == student.name and version.tags["kd.task"] == "sst2"
    assert version.tags["kd.profile"] == "smoke" and version.tags["kd.split"] == "dev"
    assert float(version.tags["kd.score"]) == round(summary.loc["student", "score"], 2)
    assert float(version.tags["kd.retention"]) == round(summary.loc["student", "retention"], 1)
    assert float(version.tags["kd.params_m"]) == round(summary.loc["student", "params"] / 1e6, 2)
    assert float(version.tags["kd.speed_up"]) == round(summary.loc["student", "speedup"], 2)
    assert client.get_model_version_by_alias("tinybert-full-smoke-sst2-student", "best").version == version.version
    assert str(student / "model") in version.description


def test_the_registered_student_is_a_pyfunc_model_with_the_students_predictions(first_run, kd_home):
    """Issue 14.3: models:/<name>@best loads as pyfunc (a signature, an input example), and its
    labels are the student's own argmax on the save_pretrained dir, computed here directly."""
    import mlflow
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    mlflow.set_tracking_uri(f"sqlite:///{kd_home / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/tinybert-full-smoke-sst2-student@best")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["text_a"]
    texts = ["a moving , beautifully acted film", "the plot is a mess and the jokes fall flat", "it is a film"]
    predicted = model.predict(pd.DataFrame({"text_a": texts}))
    (student,) = artifacts(kd_home, "task_distill_prediction")
    direct = AutoModelForSequenceClassification.from_pretrained(student / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(student / "model")
    with torch.no_grad():
        probs = direct(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    assert list(predicted["label_id"]) == probs.argmax(-1).tolist()
    assert list(predicted["label"]) == [direct.config.id2label[i] for i in probs.argmax(-1).tolist()]
    assert predicted["score"].tolist() == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)


def test_changing_one_section_reruns_that_stage_and_its_descendants_only(first_run, kd_home):
    before = {s: set(artifacts(kd_home, s)) for s in STAGE_NAMES}
    run_flow(overrides={"augment.n_aug": 1})
    rerun = {s for s in STAGE_NAMES if set(artifacts(kd_home, s)) != before[s]}
    assert rerun == {"augment", "task_distill_intermediate", "task_distill_prediction", "evaluate", "benchmark", "report"}


def test_a_prediction_setting_reruns_the_prediction_step_but_not_the_intermediate_one(first_run, kd_home):
    before = {s: set(artifacts(kd_home, s)) for s in STAGE_NAMES}
    run_flow(overrides={"task_distill.prediction.learning_rate": 5.0e-4})
    rerun = {s for s in STAGE_NAMES if set(artifacts(kd_home, s)) != before[s]}
    assert rerun == {"task_distill_prediction", "evaluate", "benchmark", "report"}


def test_minilm_flow_distils_through_an_assistant_when_the_student_is_small(first_run, kd_home):
    from transformers import AutoConfig

    from flows.minilm import minilm

    state = minilm(profile="smoke", return_state=True)
    assert state.is_completed(), state
    (assistant,) = artifacts(kd_home, "assistant_distill")
    config = AutoConfig.from_pretrained(assistant / "model")
    # smoke teacher is 4x64, student 2x32: the assistant takes the teacher's depth, the student's width
    assert (config.num_hidden_layers, config.hidden_size) == (4, 32)
    (student,) = artifacts(kd_home, "minilm_distill")
    manifest = json.loads((student / "manifest.json").read_text())
    assert manifest["inputs"]["assistant_distill"]["digest"] == json.loads((assistant / "manifest.json").read_text())["digest"]
    # the teacher's task data and fine-tuning were reused from the tinybert-full runs
    assert len(artifacts(kd_home, "finetune_teacher")) == 1


def test_kd_stage_reruns_one_stage_or_names_the_missing_upstream(first_run, kd_home, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    before = {s: [p.stat().st_mtime_ns for p in artifacts(kd_home, s)] for s in STAGE_NAMES}
    result = runner.invoke(app, ["stage", "benchmark", "--profile", "smoke"])
    assert result.exit_code == 0, result.output
    after = {s: [p.stat().st_mtime_ns for p in artifacts(kd_home, s)] for s in STAGE_NAMES}
    assert {s for s in STAGE_NAMES if before[s] != after[s]} == {"benchmark"}

    os.environ["KD_HOME"] = str(tmp_path)
    try:
        result = runner.invoke(app, ["stage", "task_distill", "--profile", "smoke"])
    finally:
        os.environ["KD_HOME"] = str(kd_home)
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    # the deepest missing stage is named: the first one to run
    assert "needs prepare_task" in text and "run it first" in text


def test_kd_stage_evaluate_prints_the_scores_it_computed(first_run, kd_home):
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["stage", "evaluate", "--profile", "smoke"])
    assert result.exit_code == 0, result.output
    newest = max(artifacts(kd_home, "evaluate"), key=lambda p: (p / "metrics.parquet").stat().st_mtime_ns)
    frame = pd.read_parquet(newest / "metrics.parquet")
    lines = [" ".join(line.replace("│", " ").split()) for line in result.output.splitlines()]
    for row in frame.itertuples():
        assert any(line.startswith(f"{row.model} ") and f" {row.score:.2f}" in f" {line}" for line in lines), (row, result.output)


def test_meta_kd_flow_trains_teachers_students_and_reports_each_domain(kd_home):
    import json

    from mlflow.tracking import MlflowClient
    from transformers import AutoConfig

    from flows.meta_kd import meta_kd
    from kd_core.metakd.core import subsample_fraction

    state = meta_kd(profile="smoke", return_state=True)  # books, dvd x fractions [1.0, 0.5] x seeds [1, 2]
    assert state.is_completed(), state
    rows = {}
    for domain in ("books", "dvd"):
        (data,) = artifacts(kd_home, f"prepare_task@{domain}")
        rows[domain] = pd.read_parquet(data / "train.parquet")
        assert len(rows[domain]) == 128  # smoke's train_limit, from 1,700
    # few-shot: the target's rows are subsampled for its teachers, the other domain stays whole
    (meta_teacher,) = artifacts(kd_home, "meta_teacher@books/f0.5")
    seen = json.loads((meta_teacher / "rows.json").read_text())["rows"]
    assert seen == {"books": len(subsample_fraction(rows["books"], 0.5, 13)), "dvd": 128} and seen["books"] < 128
    assert (meta_teacher / "model" / "metakd_head.safetensors").is_file()
    (student,) = artifacts(kd_home, "meta_distill@dvd/f0.5/s2")
    history = pd.read_parquet(student / "history.parquet")
    assert {"loss/domain_aware:transfer_mse", "loss/lambda", "loss/logits:soft_cross_entropy", "phase"} <= set(history.columns)
    assert history["step"].tolist() == list(range(1, 17))  # 8 intermediate then 8 prediction steps
    assert AutoConfig.from_pretrained(student / "model").num_hidden_layers == 2
    (report,) = [p for p in artifacts(kd_home, "report") if (p / "scores.parquet").is_file()]
    scores = pd.read_parquet(report / "scores.parquet")
    students, teachers = scores[scores.role == "student"], scores[scores.role == "teacher"]
    assert len(students) == 2 * 2 * 2 * 3 and set(students.method) == {"single", "mixed", "meta"}
    assert len(teachers) == 2 * 2 * 3 and set(teachers.seed) == {1}  # teachers trained once, first seed
    assert ((scores.score * 128 / 100 - (scores.score * 128 / 100).round()).abs() < 1e-6).all()  # 128 dev rows
    text = (report / "report.md").read_text()
    assert "## Per domain, full training data" in text and "| 0.5 |" in text and "(c) Meta-KD" in text
    client = MlflowClient(f"sqlite:///{kd_home / 'mlflow.db'}")
    assert client.search_model_versions("name = 'meta-kd-smoke-amazon-books-teacher'")
    assert client.search_model_versions("name = 'meta-kd-smoke-amazon-meta-teacher'")


def test_training_stage_runs_as_ddp_when_stage_processes_is_set(first_run, kd_home, monkeypatch):
    from flows.single_stage import single_stage

    monkeypatch.setenv("KD_STAGE_PROCESSES", "2")
    state = single_stage(stage="general_distill", profile="smoke", return_state=True)
    assert state.is_completed(), state
    results = [json.loads((p / "manifest.json").read_text())["result"] for p in artifacts(kd_home, "general_distill")]
    assert sorted(r["world_size"] for r in results) == [1, 2]  # a new key beside the 1-process artifact
    ddp = next(r for r in results if r["world_size"] == 2)
    assert ddp["steps"] == 64 and ddp["final_loss"] < ddp["first_loss"]


def test_mlflow_models_serve_answers_with_the_students_labels(first_run, kd_home):
    """Issue 14.3: `mlflow models serve -m models:/<name>@best` on 127.0.0.1 answers a real
    prediction, equal to the pyfunc's in-process one."""
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    import mlflow

    uri = f"sqlite:///{kd_home / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    texts = ["a moving , beautifully acted film", "the plot is a mess and the jokes fall flat"]
    expected = mlflow.pyfunc.load_model("models:/tinybert-full-smoke-sst2-student@best").predict(pd.DataFrame({"text_a": texts}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    server = subprocess.Popen([f"{bin_dir}/mlflow", "models", "serve", "-m", "models:/tinybert-full-smoke-sst2-student@best",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow models serve did not come up"
                time.sleep(0.5)
        body = json.dumps({"dataframe_records": [{"text_a": t} for t in texts]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            predictions = json.loads(response.read())["predictions"]
        assert [p["label"] for p in predictions] == list(expected["label"])
        assert [p["score"] for p in predictions] == pytest.approx(list(expected["score"]), abs=1e-6)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_training_stages_publish_progress_on_their_task_runs(first_run, kd_home):
    """Issue 14.7: every training stage's task run carries a Prefect progress artifact that ends
    at 100% with the step count and the loss; augmentation and corpus preparation count rows and
    blocks the same way."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType, FlowRunFilter, FlowRunFilterId

    async def fetch():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])),
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[FIRST_FLOW_RUN["id"]])))

    found = {a.description.split(":")[0]: a for a in asyncio.run(fetch())}
    training = {"general_distill", "finetune_teacher", "task_distill_intermediate", "task_distill_prediction"}
    assert set(found) == training | {"augment", "prepare_corpus"}, sorted(found)
    for stage in training:
        artifact = found[stage]
        assert float(artifact.data) == 100.0 and "step 64/64" in artifact.description and "loss" in artifact.description, artifact
    # the smoke profile: 128 training rows augmented; the corpus is cut at 256 blocks
    assert float(found["augment"].data) == 100.0 and "augment: 128/128 rows" in found["augment"].description
    (corpus,) = artifacts(kd_home, "prepare_corpus")
    blocks = json.loads((corpus / "manifest.json").read_text())["result"]["num_blocks"]
    assert float(found["prepare_corpus"].data) == 100.0
    assert f"prepare_corpus: {blocks}/{blocks} blocks" in found["prepare_corpus"].description


def test_the_parent_run_is_named_carries_the_headline_metrics_and_the_report_reaches_prefect(first_run, kd_home):
    """Issue 14.8: a distinct parent-run name, per-model score/retention/speed-up/latency on the
    parent (sortable in the runs table), config values as params only, and the report as a
    markdown artifact on the Prefect flow run."""
    import asyncio

    import mlflow
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    mlflow.set_tracking_uri(f"sqlite:///{kd_home / 'mlflow.db'}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("kd-pipeline")
    runs = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{FIRST_FLOW_RUN['id']}'",
                              max_results=50)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]

    async def flow_run_name():
        async with get_client() as prefect:
            return (await prefect.read_flow_run(FIRST_FLOW_RUN["id"])).name

    assert parent.info.run_name == f"tinybert-full:smoke:{asyncio.run(flow_run_name())}"
    summary = pd.read_parquet(Path(parent.data.tags["kd.report"]) / "summary.parquet").set_index("model")
    for model in ("teacher", "student"):
        assert parent.data.metrics[f"{model}_score"] == pytest.approx(summary.loc[model, "score"])
        assert parent.data.metrics[f"{model}_retention"] == pytest.approx(summary.loc[model, "retention"])
        assert parent.data.metrics[f"{model}_latency_ms"] == pytest.approx(summary.loc[model, "latency_ms"])
    assert parent.data.metrics["student_speedup"] == pytest.approx(summary.loc["student", "speedup"])
    (augment,) = [r for r in runs if r.data.tags.get("kd.stage") == "augment"]  # the first run's (n_aug 2)
    assert not {"k", "n_aug", "seed"} & set(augment.data.metrics) and augment.data.params["augment.n_aug"] == "2"

    async def report_artifacts():
        async with get_client() as prefect:
            return await prefect.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["kd-report"])),
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[FIRST_FLOW_RUN["id"]])))

    (report,) = asyncio.run(report_artifacts())
    assert report.type == "markdown" and "| student |" in report.data


def test_the_export_stage_writes_checked_onnx_forms_and_registers_each(first_run, kd_home):
    """Issue 14.10: export.enabled adds the export stage alone (every other stage Cached). Its
    eager score is the evaluate stage's, its float32 graph computes the student's logits on the
    dev rows (recomputed here), and each form is its own registered onnx-flavour model whose
    predictions are the graph's."""
    import mlflow
    import onnxruntime as ort
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForSequenceClassification

    from kd_core.data.features import encode_examples
    from kd_core.export import batched_logits, eager_predict, onnx_predict
    from kd_core.models.registry import load_tokenizer

    run_flow()  # earlier tests recompute benchmark alone (kd stage), which leaves the report to redo
    result, _, flow_run_id = run_flow(overrides={"export.enabled": True})
    assert stage_states(flow_run_id) == {**{stage: "Cached" for stage in STAGE_NAMES}, "export": "Completed"}
    (exported,) = artifacts(kd_home, "export")
    assert result["export"] == str(exported)
    frame = pd.read_parquet(exported / "export.parquet").set_index("form")
    # earlier tests leave other keys of the same stages in the store: follow the export's inputs
    inputs = json.loads((exported / "manifest.json").read_text())["inputs"]
    student, task = Path(inputs["task_distill_prediction"]["path"]), Path(inputs["prepare_task"]["path"])
    (evaluated,) = [a for a in artifacts(kd_home, "evaluate")
                    if json.loads((a / "manifest.json").read_text())["inputs"].get("task_distill_prediction", {}).get("key")
                    == student.name]
    scores = pd.read_parquet(evaluated / "metrics.parquet").set_index("model")["score"]
    assert frame.loc["eager", "score"] == pytest.approx(scores["student"])
    assert frame.loc["onnx", "score"] == pytest.approx(scores["student"])

    tokenizer = load_tokenizer(student / "model")
    examples = encode_examples(pd.read_parquet(task / "dev.parquet"), tokenizer, 32)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    model = AutoModelForSequenceClassification.from_pretrained(student / "model").eval()
    eager = batched_logits(eager_predict(model), examples, names, tokenizer.pad_token_id)
    for form in ("onnx", "onnx_int8"):
        session = ort.InferenceSession(str(exported / form / "model.onnx"), providers=["CPUExecutionProvider"])
        logits = batched_logits(onnx_predict(session, names), examples, names, tokenizer.pad_token_id)
        assert frame.loc[form, "max_abs_logit_diff"] == pytest.approx(np.abs(logits - eager).max(), abs=1e-5)
        assert frame.loc[form, "label_agreement"] == pytest.approx(np.mean(logits.argmax(-1) == eager.argmax(-1)))
    assert frame.loc["onnx", "max_abs_logit_diff"] < 1e-4

    mlflow.set_tracking_uri(f"sqlite:///{kd_home / 'mlflow.db'}")
    client = MlflowClient()
    feed = {n: np.asarray(v, dtype=np.int64) for n, v in tokenizer(["a moving film", "dull and far too long"],
                                                                   padding=True).items() if n in names}
    for form, role in (("onnx", "student-onnx"), ("onnx_int8", "student-onnx-int8")):
        (version,) = client.search_model_versions(f"name = 'tinybert-full-smoke-sst2-{role}'")
        assert version.tags["kd.key"] == exported.name and version.tags["kd.role"] == role
        served = mlflow.pyfunc.load_model(f"models:/tinybert-full-smoke-sst2-{role}/{version.version}")
        direct = ort.InferenceSession(str(exported / form / "model.onnx"), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(served.predict(feed)["logits"], direct.run(["logits"], feed)[0], rtol=0, atol=1e-6)
    experiment = client.get_experiment_by_name("kd-pipeline")
    runs = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'", max_results=50)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.metrics["export/onnx_int8_speedup"] == pytest.approx(frame.loc["onnx_int8", "speedup_vs_eager"], abs=1e-3)

    # a registration that failed after its artifact was written (seen on a served run) is made
    # up for by the next run that finds the artifact cached: one version for the key again
    (lost,) = client.search_model_versions("name = 'tinybert-full-smoke-sst2-student-onnx-int8'")
    client.delete_model_version(lost.name, lost.version)
    _, _, again = run_flow(overrides={"export.enabled": True})
    assert stage_states(again)["export"] == "Cached"
    (restored,) = client.search_model_versions("name = 'tinybert-full-smoke-sst2-student-onnx-int8'")
    assert restored.tags["kd.key"] == exported.name and int(restored.version) > int(lost.version)
    assert client.get_run(restored.run_id).info.run_name == "export:register"

    # `kd stage export` switches the stage on by itself, recomputes the same key, and registers no
    # second version of it
    from typer.testing import CliRunner

    from flows.cli import app

    cli = CliRunner().invoke(app, ["stage", "export", "--profile", "smoke"])
    assert cli.exit_code == 0, cli.output
    assert "onnx_int8" in cli.output and artifacts(kd_home, "export") == [exported]
    for role in ("student-onnx", "student-onnx-int8"):
        assert len(client.search_model_versions(f"name = 'tinybert-full-smoke-sst2-{role}'")) == 1
