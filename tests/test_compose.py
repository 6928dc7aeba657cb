"""docker-compose.yml and its GPU override validate with Debian's docker-compose (no engine needed).

`make setup` installs docker-compose when it is missing; without it these tests fail, not skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CPU_SERVICES = {"postgres", "prefect-server", "mlflow", "deployments", "worker-cpu"}


def compose_config(*files: str) -> dict:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed: `make setup` installs Debian's docker-compose (apt-get install docker-compose)"
    args = [exe]
    for name in files:
        args += ["-f", name]
    env = {**os.environ, "KD_DATA_DIR": "/srv/kd-shared-data"}
    env.pop("POSTGRES_PASSWORD", None)
    done = subprocess.run(args + ["config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"docker-compose {' '.join(files)} config failed:\n{done.stderr}{done.stdout}"
    return yaml.safe_load(done.stdout)


@pytest.fixture(scope="module")
def cpu() -> dict:
    return compose_config("docker-compose.yml")


@pytest.fixture(scope="module")
def gpu() -> dict:
    return compose_config("docker-compose.yml", "docker-compose.gpu.yml")


def command(service: dict) -> str:
    cmd = service.get("command", "")
    return " ".join(cmd) if isinstance(cmd, list) else cmd


def devices(service: dict) -> list:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []


def normalized(value):
    """Merging files may reorder list entries (volumes); compare them as sets."""
    if isinstance(value, dict):
        return {key: normalized(item) for key, item in value.items()}
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return sorted(value)
    return value


def test_cpu_stack_validates_without_nvidia(cpu):
    services = cpu["services"]
    assert set(services) == CPU_SERVICES
    assert not any(devices(s) for s in services.values()), "the base file must start without the nvidia runtime"
    assert "nvidia" not in yaml.safe_dump(cpu).lower()
    assert set(cpu["volumes"]) >= {"postgres-data", "mlartifacts", "kd-data"}


def test_postgres_backs_prefect_and_mlflow(cpu):
    services = cpu["services"]
    prefect = services["prefect-server"]
    assert prefect["image"] == "prefecthq/prefect:3.8.8-python3.11"
    assert prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://kd:kd@postgres:5432/prefect")
    assert prefect["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert prefect["depends_on"]["postgres"]["condition"] == "service_healthy"

    mlflow = command(services["mlflow"])
    assert "--backend-store-uri postgresql://kd:kd@postgres:5432/mlflow" in mlflow
    assert "--artifacts-destination /mlartifacts" in mlflow
    hosts = re.search(r"--allowed-hosts (\S+)", mlflow).group(1).split(",")
    assert {"mlflow", "mlflow:*"} <= set(hosts), "workers reach MLflow as mlflow:5000; MLflow 3 rejects unknown Host headers"
    assert services["mlflow"]["environment"]["MLFLOW_DISABLE_TELEMETRY"] == "true"
    # postgres creates the mlflow database on first start
    mounts = " ".join(services["postgres"]["volumes"])
    assert "postgres-init.sql:/docker-entrypoint-initdb.d/" in mounts
    assert "CREATE DATABASE mlflow" in (REPO / "scripts" / "postgres-init.sql").read_text()


def test_cpu_worker_and_deployments(cpu):
    services = cpu["services"]
    worker = services["worker-cpu"]
    assert "--pool kd-cpu" in command(worker)
    env = worker["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["KD_HOME"] == "/data"
    assert any(v.startswith("kd-data:/data") for v in worker["volumes"])
    assert "/srv/kd-shared-data:/shared/data:ro" in worker["volumes"]  # KD_DATA_DIR from the environment
    deploy = command(services["deployments"])
    assert "deploy --all" in deploy and "kd-cpu" in deploy and "kd-gpu" in deploy


def test_gpu_override_adds_only_the_gpu_worker(cpu, gpu):
    services = gpu["services"]
    assert set(services) == CPU_SERVICES | {"worker-gpu"}
    worker = services["worker-gpu"]
    assert "--pool kd-gpu" in command(worker)
    (device,) = devices(worker)
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert [name for name, s in services.items() if devices(s)] == ["worker-gpu"]
    assert worker["build"]["args"]["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")
    # the override leaves the CPU services as they are
    for name in CPU_SERVICES:
        assert normalized(services[name]) == normalized(cpu["services"][name]), name
    # both workers share the artifact store, so stage outputs cross pools
    assert any(v.startswith("kd-data:/data") for v in worker["volumes"])


def test_worker_pools_exist_in_prefect_yaml(gpu):
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pools = {d["work_pool"]["name"] for d in spec["deployments"]}
    assert pools == {"kd-cpu", "kd-gpu"}
    for name in ("worker-cpu", "worker-gpu"):
        pool = re.search(r"--pool (\S+)", command(gpu["services"][name])).group(1)
        assert pool in pools


def test_dockerfile_copies_what_exists():
    text = (REPO / "Dockerfile").read_text()
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    copies = re.findall(r"^COPY (.+) \S+$", text, flags=re.M)
    assert copies
    for sources in copies:
        for source in sources.split():
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
            assert source not in ignored, f".dockerignore drops {source}, which the Dockerfile copies"
    assert "torch==2.13.0" in text and "${TORCH_INDEX}" in text
    assert {".venv", "data"} <= ignored, "the build context must not ship the venv or the stores"


def test_the_prefect_api_takes_the_secret_every_service_sends_and_only_its_ui_origin(cpu):
    """Issue 16.6 in the compose stack: CORS for the UI's own origin, basic auth on the API, and the
    workers and the deployments job configured with the same secret."""
    server = cpu["services"]["prefect-server"]["environment"]
    assert server["PREFECT_SERVER_CORS_ALLOWED_ORIGINS"] == "http://127.0.0.1:4200,http://localhost:4200"
    secret = server["PREFECT_SERVER_API_AUTH_STRING"]
    assert secret and ":" in secret
    for name in ("deployments", "worker-cpu"):
        assert cpu["services"][name]["environment"]["PREFECT_API_AUTH_STRING"] == secret, name
