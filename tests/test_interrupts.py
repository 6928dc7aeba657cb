"""Issue 16 in real processes: the root cause ends the output, SIGTERM stops a training stage
within seconds and the rerun resumes, and two runs on one fresh store share the work."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

KD = [sys.executable, "-c", "from flows.cli import app; app()"]


def _env(home: Path, kd_data_dir: Path) -> dict:
    env = {**os.environ, "KD_HOME": str(home), "KD_DATA_DIR": str(kd_data_dir), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    return env


def _our_prefect_servers(home: Path) -> list[psutil.Process]:
    """Prefect API servers started for this KD_HOME (they inherit its environment)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "prefect.server.api.server:create_app" in " ".join(proc.info["cmdline"] or []) \
                    and proc.environ().get("KD_HOME") == str(home):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _runs(home: Path) -> list[tuple[str, str, str | None]]:
    """(run name, status, kd.stage tag) of every MLflow run in the sqlite store."""
    with sqlite3.connect(home / "mlflow.db") as db:
        return db.execute(
            "SELECT r.name, r.status, t.value FROM runs r LEFT JOIN tags t "
            "ON t.run_uuid = r.run_uuid AND t.key = 'kd.stage'").fetchall()


def _manifests(home: Path, stage: str) -> list[dict]:
    import json

    root = home / "artifacts" / stage
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/manifest.json"))] if root.is_dir() else []


def test_a_user_error_inside_a_stage_is_the_last_line_and_its_traceback_goes_to_a_log(tmp_path, kd_data_dir):
    data = tmp_path / "data"
    (data / "glue" / "SST-2").mkdir(parents=True)
    (data / "wikipedia_sample").symlink_to(kd_data_dir / "wikipedia_sample")
    rows = (kd_data_dir / "glue" / "SST-2" / "train.tsv").read_text().splitlines()[:200]
    rows[59] = rows[59].rsplit("\t", 1)[0] + "\t7"  # file line 60: a label SST-2 does not have
    (data / "glue" / "SST-2" / "train.tsv").write_text("\n".join(rows) + "\n")
    (data / "glue" / "SST-2" / "dev.tsv").write_text((kd_data_dir / "glue" / "SST-2" / "dev.tsv").read_text())
    home = tmp_path / "home"
    result = subprocess.run([*KD, "run", "tinybert-full", "--profile", "smoke", "-p", f"data_dir={data}"],
                            capture_output=True, text=True, env=_env(home, kd_data_dir), timeout=300)
    output = result.stdout + result.stderr
    last = output.strip().splitlines()[-1]
    assert result.returncode == 2, output[-3000:]
    assert last.startswith("error: stage prepare_task: ") and "train.tsv, line 60: unknown label '7'" in last, last
    assert "Traceback" not in output and "UnfinishedRun" not in output
    log = Path(last.rsplit("(traceback: ", 1)[1].rstrip(")"))
    assert log.is_file() and "Traceback" in log.read_text() and "DataFormatError" in log.read_text()
    assert not _our_prefect_servers(home)
    assert {(status, stage) for _, status, stage in _runs(home) if stage in (None, "prepare_task")} == {
        ("FAILED", None), ("FAILED", "prepare_task")}


def test_sigterm_checkpoints_the_training_stage_stops_everything_and_the_rerun_resumes(tmp_path, kd_data_dir):
    home = tmp_path / "home"
    env = _env(home, kd_data_dir)
    long_gd = ["-p", "general_distill.train.max_steps=400", "-p", "general_distill.train.checkpoint_every=20"]
    proc = subprocess.Popen([*KD, "run", "tinybert-full", "--profile", "smoke", *long_gd],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 240
    while not list((home / "artifacts" / ".work" / "general_distill").glob("*/checkpoints/step-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "general distillation never checkpointed"
        time.sleep(0.2)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    elapsed = time.monotonic() - sent
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert elapsed < 10, elapsed  # the bound of issue 16: 10 s plus one (tiny) step
    last = output.strip().splitlines()[-1]
    assert last.startswith("stopped: stage general_distill stopped at step ") and "rerun the same command" in last
    assert not _our_prefect_servers(home)  # the ephemeral server went with the command
    statuses = {(stage, status) for _, status, stage in _runs(home)}
    assert ("general_distill", "KILLED") in statuses and (None, "KILLED") in statuses, statuses
    assert not any(status == "RUNNING" for _, status in statuses)
    assert not _manifests(home, "general_distill")  # nothing half-written is visible

    rerun = subprocess.run([*KD, "stage", "general_distill", "--profile", "smoke", *long_gd],
                           capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    (manifest,) = _manifests(home, "general_distill")
    assert manifest["result"]["resumed_from"] > 0 and manifest["result"]["steps"] == 400


@pytest.mark.timeout(900)
def test_two_runs_on_one_fresh_store_compute_every_stage_once(tmp_path, kd_data_dir):
    home = tmp_path / "home"
    env = _env(home, kd_data_dir)
    command = [*KD, "run", "tinybert-full", "--profile", "smoke"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    time.sleep(1)  # the reported race: the second run starts while the first creates the MLflow store
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    outputs = [p.communicate(timeout=800)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [o[-3000:] for o in outputs]
    stages = ["prepare_corpus", "general_distill", "prepare_task", "finetune_teacher", "augment",
              "task_distill_intermediate", "task_distill_prediction", "evaluate", "benchmark", "report"]
    for stage in stages:
        assert len(_manifests(home, stage)) == 1, stage
    # every stage computed exactly once across the two: one FINISHED MLflow stage run each
    computed = sorted(stage for _, status, stage in _runs(home) if stage and status == "FINISHED")
    assert computed == sorted(stages)
    # the two reports are one artifact, so both runs printed the same table
    assert outputs[0].split("| teacher |")[1][:200] == outputs[1].split("| teacher |")[1][:200]


def test_after_kill_9_the_next_command_stops_the_orphaned_server_closes_the_runs_and_resumes(tmp_path, kd_data_dir):
    home = tmp_path / "home"
    env = _env(home, kd_data_dir)
    long_gd = ["-p", "general_distill.train.max_steps=300", "-p", "general_distill.train.checkpoint_every=20"]
    proc = subprocess.Popen([*KD, "run", "tinybert-full", "--profile", "smoke", *long_gd],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 240
    while not list((home / "artifacts" / ".work" / "general_distill").glob("*/checkpoints/step-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "general distillation never checkpointed"
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    time.sleep(1)
    orphans = _our_prefect_servers(home)
    assert orphans and all(p.ppid() == 1 for p in orphans)  # what kill -9 leaves: nothing can clean up in-process
    assert any(status == "RUNNING" for _, status, _ in _runs(home))

    rerun = subprocess.run([*KD, "stage", "general_distill", "--profile", "smoke", *long_gd],
                           capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert f"pid {orphans[0].pid}" in rerun.stdout + rerun.stderr
    assert not _our_prefect_servers(home)
    assert not any(status == "RUNNING" for _, status, _ in _runs(home))
    (manifest,) = _manifests(home, "general_distill")
    assert manifest["result"]["resumed_from"] > 0
