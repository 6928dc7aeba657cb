"""docker-compose.yml and its GPU override validate with Debian's docker-compose (no engine needed).

`make setup` installs docker-compose when it is missing; without it these tests fail, not skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# the compose files have no default credentials; these stand in for a user's .env
CREDENTIALS = {"POSTGRES_PASSWORD": "pg-secret-from-env", "PREFECT_API_AUTH_STRING": "kd:api-secret-from-env"}
CPU_SERVICES = {"postgres", "prefect-server", "mlflow", "deployments", "worker-cpu"}


def run_config(*files: str, credentials: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is not installed: `make setup` installs Debian's docker-compose (apt-get install docker-compose)"
    empty = Path(tempfile.mkdtemp(prefix="kd-compose-")) / "empty.env"
    empty.write_text("")
    args = [exe, "--env-file", str(empty)]  # not the checkout's .env, if a user has one
    for name in files:
        args += ["-f", name]
    env = {**os.environ, "KD_DATA_DIR": "/srv/kd-shared-data", **(CREDENTIALS if credentials is None else credentials)}
    for key in CREDENTIALS:
        if key not in (CREDENTIALS if credentials is None else credentials):
            env.pop(key, None)
    return subprocess.run(args + ["config"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def compose_config(*files: str) -> dict:
    done = run_config(*files)
    assert done.returncode == 0, f"docker-compose {' '.join(files)} config failed:\n{done.stderr}{done.stdout}"
    return yaml.safe_load(done.stdout)


@pytest.fixture(scope="module")
def cpu() -> dict:
    return compose_config("docker-compose.yml", "docker-compose.override.yml")


@pytest.fixture(scope="module")
def gpu() -> dict:
    return compose_config("docker-compose.yml", "docker-compose.override.yml", "docker-compose.gpu.yml")


@pytest.fixture(scope="module")
def local() -> dict:
    return compose_config("docker-compose.yml", "docker-compose.local.yml")


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
    assert prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://kd:pg-secret-from-env@postgres:5432/prefect")
    assert prefect["environment"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert prefect["depends_on"]["postgres"]["condition"] == "service_healthy"

    mlflow = command(services["mlflow"])
    assert "--backend-store-uri postgresql+psycopg2://kd:pg-secret-from-env@postgres:5432/mlflow" in mlflow
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
    assert secret == CREDENTIALS["PREFECT_API_AUTH_STRING"]
    for name in ("deployments", "worker-cpu"):
        assert cpu["services"][name]["environment"]["PREFECT_API_AUTH_STRING"] == secret, name


@pytest.mark.parametrize("missing", sorted(CREDENTIALS))
def test_without_credentials_compose_refuses_and_says_how_to_make_them(missing):
    """No service may start on a password README did not make the user set: each credential is
    required, and the error names it and `make compose-env`."""
    done = run_config("docker-compose.yml", credentials={k: v for k, v in CREDENTIALS.items() if k != missing})
    assert done.returncode != 0
    assert missing in done.stderr and "make compose-env" in done.stderr, done.stderr
    for name in ("docker-compose.yml", "docker-compose.override.yml", "docker-compose.gpu.yml", "docker-compose.local.yml"):
        text = (REPO / name).read_text()
        assert not re.search(r"\$\{(POSTGRES_PASSWORD|PREFECT_API_AUTH_STRING):-", text), f"{name} has a default credential"


def test_the_gpu_worker_sends_the_api_secret(gpu):
    env = gpu["services"]["worker-gpu"]["environment"]
    assert env["PREFECT_API_AUTH_STRING"] == CREDENTIALS["PREFECT_API_AUTH_STRING"]


def test_every_published_port_is_on_loopback(cpu, gpu):
    assert cpu["services"]["prefect-server"]["ports"] and cpu["services"]["mlflow"]["ports"]
    for stack in (cpu, gpu):
        for name, service in stack["services"].items():
            for port in service.get("ports", []):
                published = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port.get('published')}"
                assert published.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_the_local_override_uses_host_networking_local_images_and_loopback_servers(cpu, local):
    services = local["services"]
    assert set(services) == CPU_SERVICES
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert not service.get("ports"), f"{name}: a host-network container cannot publish ports"
        assert service["image"] in {"kd-pipeline:cpu", "kd-postgres:15"}, name
        assert service["build"]["args"]["BASE_IMAGE"] == "kd-base:bookworm", name
    # with the host's network, whatever a server listens on is the host's: loopback only
    assert "--host 127.0.0.1" in command(services["prefect-server"])
    assert "--host 127.0.0.1" in command(services["mlflow"])
    assert services["postgres"]["environment"]["POSTGRES_LISTEN"] == "127.0.0.1"
    assert services["postgres"]["build"]["dockerfile"] == "docker/postgres.Dockerfile"
    # the base file's service names resolve to loopback, so its URLs stay as they are
    for name in ("prefect-server", "mlflow", "deployments", "worker-cpu"):
        assert services[name]["extra_hosts"] == {"postgres": "127.0.0.1", "prefect-server": "127.0.0.1", "mlflow": "127.0.0.1"}, name
    assert services["worker-cpu"]["environment"] == cpu["services"]["worker-cpu"]["environment"]
    assert command(services["mlflow"]).replace("--host 127.0.0.1", "--host 0.0.0.0") == command(cpu["services"]["mlflow"])
    # postgres keeps its data on the named volume, and creates MLflow's database the same way
    assert normalized(services["postgres"]["volumes"]) == normalized(cpu["services"]["postgres"]["volumes"])


def test_the_local_postgres_image_runs_the_init_scripts_and_listens_where_told():
    """The entrypoint keeps the official image's contract the stack relies on."""
    script = (REPO / "docker" / "postgres-entrypoint.sh").read_text()
    assert "/docker-entrypoint-initdb.d/*.sql" in script
    assert 'listen_addresses="$POSTGRES_LISTEN"' in script and "POSTGRES_LISTEN:=127.0.0.1" in script
    assert "--auth-host=scram-sha-256" in script
    dockerfile = (REPO / "docker" / "postgres.Dockerfile").read_text()
    assert "postgresql-15" in dockerfile and "VOLUME /var/lib/postgresql/data" in dockerfile


def test_compose_env_generates_private_distinct_credentials_once(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("compose_stack", REPO / "scripts" / "compose_stack.py")
    compose_stack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compose_stack)
    first = compose_stack.write_env(tmp_path / "a.env")
    second = compose_stack.write_env(tmp_path / "b.env")
    assert first.stat().st_mode & 0o777 == 0o600
    a, b = compose_stack.read_env(first), compose_stack.read_env(second)
    assert set(a) == set(CREDENTIALS)
    assert a["PREFECT_API_AUTH_STRING"].startswith("kd:") and len(a["POSTGRES_PASSWORD"]) >= 32
    assert a != b, "every env file gets its own secrets"
    # an existing file is kept: changing the password would lock postgres out of its volume
    compose_stack.write_env(first)
    assert compose_stack.read_env(first) == a
    # the build context never carries the credentials
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".compose" in ignored
