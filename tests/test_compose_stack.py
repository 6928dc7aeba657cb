"""The compose stack for real: containers up, a deployment run on the worker container, MLflow's
REST API, a cached second run, and postgres keeping its data across down/up.

It runs when a Docker daemon answers and the stack's images exist (``make compose-up`` builds
them), and is skipped with the reason otherwise; it rebuilds them first (from the layer cache).
``make compose-test`` (KD_COMPOSE_TEST=1) also starts the daemon and builds what is missing. It brings up its own
compose project with its own credentials and volumes, and removes them (and a daemon it started) when it is done.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest
from test_pipeline import STAGE_NAMES, stage_states
from test_servers import mlflow_runs, parent_and_stages, run_deployment, tags, wait_flow_run

REPO = Path(__file__).resolve().parents[1]
FLOW_RUN_S = 900  # a smoke flow run on the worker container, 2 loaded cores
REGISTERED = "tinybert-full-smoke-sst2-student"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compose_stack = _load("compose_stack")
kd_stack = compose_stack.kd_stack
OPTED_IN = os.environ.get("KD_COMPOSE_TEST") == "1"


def skip_reason() -> str | None:
    if shutil.which("docker-compose") is None or shutil.which("docker") is None:
        return "docker and docker-compose are not installed (apt-get install docker.io docker-compose)"
    if OPTED_IN:
        return None
    if not compose_stack.daemon_running():
        return "no Docker daemon answers; `make compose-test` starts one and builds the images"
    missing = [image for image in (compose_stack.CPU_IMAGE, compose_stack.POSTGRES_IMAGE) if not compose_stack.image_exists(image)]
    if missing:
        return f"images {', '.join(missing)} are not built; `make compose-up` or `make compose-test` builds them"
    busy = [port for port in compose_stack.LOCAL_PORTS.values() if kd_stack.port_in_use(port)]
    if busy:
        return f"ports {busy} are in use (another stack?); the local stack needs 5432, 4200 and 5000"
    return None


SKIP_REASON = skip_reason()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, kd_data_dir):
    tmp = tmp_path_factory.mktemp("compose")
    saved = {k: os.environ.get(k) for k in ("KD_COMPOSE_PROJECT", "KD_COMPOSE_ENV_FILE", "KD_DATA_DIR")}
    os.environ["KD_COMPOSE_PROJECT"] = f"kd-e2e-{secrets.token_hex(3)}"
    os.environ["KD_COMPOSE_ENV_FILE"] = str(compose_stack.write_env(tmp / "compose.env"))
    os.environ["KD_DATA_DIR"] = str(kd_data_dir)
    creds = compose_stack.read_env()
    started_daemon = False
    info: dict = {}
    try:
        started = time.monotonic()
        info = compose_stack.up("auto")  # builds: layers are cached, so never a stale image, in seconds when unchanged
        started_daemon = info["started_daemon"]
        info["up_total_s"] = round(time.monotonic() - started, 1)
        print(f"\ncompose stack up: {info}")
        env = {
            **os.environ,
            "PREFECT_API_URL": f"{compose_stack.PREFECT_URL}/api",
            "PREFECT_API_AUTH_STRING": creds["PREFECT_API_AUTH_STRING"],
            "PREFECT_HOME": str(tmp / "prefect-home"),
        }
        yield {"info": info, "env": env, "auth": creds["PREFECT_API_AUTH_STRING"], "runs": {}}
    finally:
        if compose_stack.daemon_running():
            print(compose_stack.logs(info.get("mode", "local"), "worker-cpu", 20))
            compose_stack.compose(compose_stack.saved_mode(), "down", "--volumes", check=False)
            left = subprocess.run(["docker", "volume", "ls", "-q", "--filter", f"name={os.environ['KD_COMPOSE_PROJECT']}"],
                                  capture_output=True, text=True).stdout.split()
            assert not left, f"volumes left behind: {left}"
        if started_daemon:
            compose_stack.stop_daemon()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def diagnostics(stack) -> callable:
    return lambda: compose_stack.logs(stack["info"]["mode"], "worker-cpu", 60)


def run_smoke(stack) -> tuple[str, float]:
    api = stack["env"]["PREFECT_API_URL"]
    started = time.monotonic()
    run_id = run_deployment(stack["env"], "tinybert-full/default", "profile=smoke")
    run = wait_flow_run(api, run_id, FLOW_RUN_S, diagnostics(stack), auth=stack["auth"])
    elapsed = time.monotonic() - started
    assert run["state_type"] == "COMPLETED", f"{run['state_type']}: {run['state']['message']}\n{diagnostics(stack)()}"
    return run_id, elapsed


def mlflow_json(path: str, payload: dict | None = None):
    return kd_stack.http_json(f"{compose_stack.MLFLOW_URL}{path}", payload)


def test_a_deployment_run_completes_on_the_worker_container(stack):
    run_id, elapsed = run_smoke(stack)
    stack["runs"]["first"] = run_id
    print(f"first smoke run on the worker container: {elapsed:.0f}s")
    run = kd_stack.http_json(f"{stack['env']['PREFECT_API_URL']}/flow_runs/{run_id}", auth=stack["auth"])
    assert run["work_pool_name"] == "kd-cpu"
    # the worker container, not a process on this host, ran it: its log names the flow run
    worker_log = compose_stack.logs(stack["info"]["mode"], "worker-cpu", 400)
    assert run_id in worker_log, worker_log[-3000:]


def test_the_mlflow_server_has_the_runs_the_report_and_the_models(stack):
    run_id = stack["runs"].get("first") or pytest.skip("needs the first run")
    runs = mlflow_runs(compose_stack.MLFLOW_URL, run_id)
    parent, stages = parent_and_stages(runs)
    assert parent["info"]["status"] == "FINISHED"
    assert set(stages) == set(STAGE_NAMES)
    assert all(run["info"]["status"] == "FINISHED" for run in stages.values())
    # the report's files went through the MLflow server onto its artifacts volume
    listed = mlflow_json("/api/2.0/mlflow/artifacts/list?" + urllib.parse.urlencode({"run_id": stages["report"]["info"]["run_id"]}))
    names = {Path(f["path"]).name for f in listed.get("files", [])}
    assert any(name.endswith(".md") for name in names) and any(name.endswith(".png") for name in names), names
    # the registered student points at one of this flow run's MLflow runs
    model = mlflow_json("/api/2.0/mlflow/registered-models/get?" + urllib.parse.urlencode({"name": REGISTERED}))["registered_model"]
    run_ids = {r["info"]["run_id"] for r in runs}
    versions = mlflow_json("/api/2.0/mlflow/model-versions/search?" + urllib.parse.urlencode({"filter": f"name='{REGISTERED}'"}))
    assert any(v["run_id"] in run_ids for v in versions["model_versions"]), (model, versions)
    assert tags(parent)["prefect.flow_run_id"] == run_id


def test_a_second_run_finds_every_stage_cached_on_the_shared_volume(stack, monkeypatch):
    stack["runs"].get("first") or pytest.skip("needs the first run")
    run_id, elapsed = run_smoke(stack)
    stack["runs"]["second"] = run_id
    print(f"second (cached) smoke run: {elapsed:.0f}s")
    monkeypatch.setenv("PREFECT_API_URL", stack["env"]["PREFECT_API_URL"])
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", stack["auth"])
    assert stage_states(run_id) == {stage: "Cached" for stage in STAGE_NAMES}


def test_down_and_up_keeps_the_runs(stack):
    run_id = stack["runs"].get("first") or pytest.skip("needs the first run")
    mode = stack["info"]["mode"]
    started = time.monotonic()
    compose_stack.compose(mode, "down")  # no --volumes: what a user does to restart
    compose_stack.compose(mode, "up", "-d", "--no-build")
    compose_stack.wait_ready(mode)
    print(f"down + up: {time.monotonic() - started:.0f}s")
    run = kd_stack.http_json(f"{stack['env']['PREFECT_API_URL']}/flow_runs/{run_id}", auth=stack["auth"])
    assert run["state_type"] == "COMPLETED"
    parent, stages = parent_and_stages(mlflow_runs(compose_stack.MLFLOW_URL, run_id))
    assert parent["info"]["status"] == "FINISHED" and set(stages) == set(STAGE_NAMES)
