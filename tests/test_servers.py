"""The real path: a Prefect server, an MLflow server, served deployments, `prefect deployment run`.

The stack is `scripts/kd_stack.py serve` -- what `make serve` runs -- on free loopback ports, with
a temp KD_HOME (so a temp sqlite store and a temp PREFECT_HOME for the server). The flow runs are
started with the Prefect CLI, watched through the Prefect REST API, and checked in MLflow through
its REST API. A second test deploys prefect.yaml to its own server and runs a deployment through
a process worker on the kd-cpu pool. Everything is stopped in teardown, and the stack's shutdown
(Ctrl-C) is itself tested: no process it started survives it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FLOW = "tinybert-full"
STAGES = {
    "prepare_corpus", "general_distill", "prepare_task", "finetune_teacher", "augment",
    "task_distill_intermediate", "task_distill_prediction", "evaluate", "benchmark", "report",
}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
STACK_UP_S = 180      # Prefect + MLflow servers up and every deployment registered
FLOW_RUN_S = 300      # one smoke flow run, from `deployment run` to a terminal state
STOP_S = 60


def _load_kd_stack():
    spec = importlib.util.spec_from_file_location("kd_stack", REPO / "scripts" / "kd_stack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kd_stack"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


kd_stack = _load_kd_stack()


def base_env(home: Path, data_dir: Path, prefect_home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        KD_HOME=str(home),
        KD_DATA_DIR=str(data_dir),
        PREFECT_HOME=str(prefect_home),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PREFECT_RUNNER_POLL_FREQUENCY="2",
        PREFECT_WORKER_QUERY_SECONDS="2",
        **kd_stack.QUIET_ENV,
    )
    return env


def tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} missing)"
    return f"--- {path.name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def prefect_cli(env: dict, *args: str, cwd: Path = REPO, timeout: float = 120) -> str:
    done = subprocess.run(
        [kd_stack.tool("prefect"), *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"prefect {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def run_deployment(env: dict, name: str, *params: str) -> str:
    """`prefect deployment run NAME -p ...` from another process; returns the flow-run id."""
    args = ["deployment", "run", name]
    for param in params:
        args += ["-p", param]
    out = prefect_cli(env, *args)
    match = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert match, f"no flow-run id in:\n{out}"
    return match.group(1)


def wait_flow_run(api: str, run_id: str, timeout: float, diagnostics, auth: str | None = None) -> dict:
    deadline = time.monotonic() + timeout
    run = {}
    while time.monotonic() < deadline:
        run = kd_stack.http_json(f"{api}/flow_runs/{run_id}", auth=auth)
        if run.get("state_type") in TERMINAL:
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {run_id} still {run.get('state_type')} after {timeout}s\n{diagnostics()}")


def wait_deployments(api: str, names: list[str], timeout: float, alive, diagnostics, auth=None) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    found: dict[str, dict] = {}
    while time.monotonic() < deadline:
        assert alive(), f"the stack exited before serving:\n{diagnostics()}"
        for name in names:
            if name not in found:
                try:
                    found[name] = kd_stack.http_json(f"{api}/deployments/name/{name}", timeout=5, auth=auth() if auth else None)
                except OSError:
                    pass
        if len(found) == len(names):
            return found
        time.sleep(1)
    raise AssertionError(f"deployments {sorted(set(names) - set(found))} not served after {timeout}s\n{diagnostics()}")


def alive_pids(family: list[tuple[int, str]]) -> list[int]:
    """Those of ``family`` (pid, start time) still running; zombies (exited, unreaped) do not count."""
    alive = []
    for pid, started in family:
        stat = kd_stack._proc_stat(pid)
        if stat and stat[19] == started and stat[0] not in ("Z", "X"):
            alive.append(pid)
    return alive


def mlflow_runs(tracking: str, flow_run_id: str) -> list[dict]:
    experiment = kd_stack.http_json(
        f"{tracking}/api/2.0/mlflow/experiments/get-by-name?" + urllib.parse.urlencode({"experiment_name": "kd-pipeline"})
    )["experiment"]
    body = {
        "experiment_ids": [experiment["experiment_id"]],
        "filter": f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
        "max_results": 1000,
    }
    return kd_stack.http_json(f"{tracking}/api/2.0/mlflow/runs/search", body).get("runs", [])


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def parent_and_stages(runs: list[dict]) -> tuple[dict, dict[str, dict]]:
    parents = [r for r in runs if "mlflow.parentRunId" not in tags(r)]
    assert len(parents) == 1, f"expected one parent run, got {[r['info']['run_name'] for r in parents]}"
    parent = parents[0]
    stages = {}
    for run in runs:
        if run is parent:
            continue
        assert tags(run)["mlflow.parentRunId"] == parent["info"]["run_id"], run["info"]["run_name"]
        stages[tags(run)["kd.stage"]] = run
    return parent, stages


# --------------------------------------------------------------------------- make serve's stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory, kd_data_dir):
    from flows.serve import deployment_names

    root = tmp_path_factory.mktemp("stack")
    home = root / "kd_home"
    home.mkdir()
    env = base_env(home, kd_data_dir, root / "prefect_home")
    prefect_port, mlflow_port = kd_stack.free_port(), kd_stack.free_port()
    while mlflow_port == prefect_port:
        mlflow_port = kd_stack.free_port()
    log = root / "stack.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "kd_stack.py"), "serve",
             "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port), "--timeout", "150"],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )

    def diagnostics() -> str:
        return "\n".join(tail(p) for p in (log, home / "logs" / "prefect-server.log", home / "logs" / "mlflow-server.log"))

    info = {
        "api": f"http://127.0.0.1:{prefect_port}/api",
        "tracking": f"http://127.0.0.1:{mlflow_port}",
        "ports": (prefect_port, mlflow_port),
        "home": home,
        "proc": proc,
        "diagnostics": diagnostics,
        "cli_env": {**env, "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api"},
    }
    auth_file = home / kd_stack.API_AUTH_FILE

    def auth() -> str:  # written by the stack when it starts
        return auth_file.read_text().strip() if auth_file.is_file() else ""

    try:
        started = time.monotonic()
        info["deployments"] = wait_deployments(info["api"], deployment_names(), STACK_UP_S, lambda: proc.poll() is None,
                                               diagnostics, auth)
        info["auth"] = auth()
        info["cli_env"]["PREFECT_API_AUTH_STRING"] = info["auth"]
        info["startup_s"] = time.monotonic() - started
        yield info
    finally:
        # Normally test_stack_stops_cleanly has stopped it already; this is the safety net.
        if proc.poll() is None:
            family = kd_stack.descendants(proc.pid)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
            for pid, started in family:
                kd_stack._signal_group(pid, signal.SIGKILL)  # the servers lead their own groups
                kd_stack._kill((pid, started), signal.SIGKILL)


def test_every_registry_flow_is_served(stack):
    from flows.registry import FLOW_NAMES
    from flows.serve import deployment_names

    names = deployment_names()
    assert {f"{flow}/default" for flow in FLOW_NAMES} <= set(names)
    assert set(stack["deployments"]) == set(names)
    schema = stack["deployments"][f"{FLOW}/default"]["parameter_openapi_schema"]["properties"]
    assert {"profile", "overrides", "force"} <= set(schema)


def test_deployment_run_completes_and_mlflow_has_the_runs(stack):
    env, api, tracking = stack["cli_env"], stack["api"], stack["tracking"]
    started = time.monotonic()
    run_id = run_deployment(env, f"{FLOW}/default", "profile=smoke")
    run = wait_flow_run(api, run_id, FLOW_RUN_S, stack["diagnostics"], stack["auth"])
    elapsed = time.monotonic() - started
    assert run["state_type"] == "COMPLETED", f"{run['state_type']}: {run['state']}\n{stack['diagnostics']()}"
    assert run["parameters"] == {"profile": "smoke"}
    print(f"stack up in {stack['startup_s']:.1f}s; deployment run to Completed in {elapsed:.1f}s")

    parent, stages = parent_and_stages(mlflow_runs(tracking, run_id))
    assert tags(parent)["kd.flow"] == FLOW
    assert parent["info"]["status"] == "FINISHED"
    assert set(stages) == STAGES
    assert all(s["info"]["status"] == "FINISHED" for s in stages.values())
    losses = {m["key"] for m in stages["general_distill"]["data"].get("metrics", [])}
    assert any(key.startswith("loss") for key in losses), losses

    # the report reached the parent run's artifacts, served by the MLflow server
    query = urllib.parse.urlencode({"run_id": parent["info"]["run_id"]})
    listing = kd_stack.http_json(f"{tracking}/api/2.0/mlflow/artifacts/list?" + query)
    assert {"report.md", "report.html"} <= {f["path"] for f in listing.get("files", [])}
    assert list((stack["home"] / "mlartifacts").rglob("report.md")), "artifacts land under $KD_HOME/mlartifacts"

    # the served flow run carries its report, the link to its MLflow parent run and the training
    # stages' progress, as Prefect artifacts
    found = kd_stack.http_json(f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}},
                               auth=stack["auth"])
    by_key = {a["key"]: a for a in found if a.get("key")}
    assert "| student |" in by_key["kd-report"]["data"]
    assert parent["info"]["run_id"] in by_key["kd-mlflow-run"]["data"]
    progress = [a for a in found if a["type"] == "progress"]
    assert {a["description"].split(":")[0] for a in progress} >= {"general_distill", "task_distill_prediction", "augment"}
    assert all(float(a["data"]) == 100.0 for a in progress), progress
    # the run form's profile is a choice the server enforces
    rejected = subprocess.run([kd_stack.tool("prefect"), "deployment", "run", f"{FLOW}/default", "-p", "profile=no-such-profile"],
                              cwd=REPO, capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert rejected.returncode != 0 and "is not one of" in rejected.stdout + rejected.stderr

    # the student is registered, its version linked to the task-distillation run
    name = f"{FLOW}-smoke-sst2-student"
    versions = kd_stack.http_json(
        f"{tracking}/api/2.0/mlflow/model-versions/search?" + urllib.parse.urlencode({"filter": f"name='{name}'"})
    ).get("model_versions", [])
    assert {v["run_id"] for v in versions} & {s["info"]["run_id"] for s in stages.values()}, versions
    stack["first_run"] = run_id


def test_json_parameters_from_the_cli(stack):
    """-p 'force=["evaluate"]': the list reaches the flow; only that stage reruns, the rest is cached."""
    if "first_run" not in stack:
        pytest.skip("needs the first deployment run")
    env, api, tracking = stack["cli_env"], stack["api"], stack["tracking"]
    run_id = run_deployment(env, f"{FLOW}/default", "profile=smoke", 'force=["evaluate"]')
    run = wait_flow_run(api, run_id, FLOW_RUN_S, stack["diagnostics"], stack["auth"])
    assert run["state_type"] == "COMPLETED", f"{run['state_type']}: {run['state']}\n{stack['diagnostics']()}"
    assert run["parameters"] == {"profile": "smoke", "force": ["evaluate"]}
    _, stages = parent_and_stages(mlflow_runs(tracking, run_id))
    assert "evaluate" in stages
    assert not {"prepare_corpus", "general_distill", "finetune_teacher", "task_distill_intermediate"} & set(stages), sorted(stages)


def _raw(url: str, method: str = "GET", headers: dict | None = None, body: bytes | None = None):
    """(status, headers) of one request, without raising on 4xx."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def test_the_prefect_ui_and_api_serve_their_own_origin_only(stack):
    """Issue 14.1: the UI calls the API on its own port. Issue 16.6: no CORS grant to other
    origins, and every API call (a foreign Host header included) needs the KD_HOME's auth string."""
    import base64

    base = stack["api"].removesuffix("/api")
    ui_settings = kd_stack.http_json(f"{base}/ui-settings")
    assert ui_settings["api_url"] == stack["api"], ui_settings
    basic = {"Authorization": "Basic " + base64.b64encode(stack["auth"].encode()).decode()}
    query = (f"{stack['api']}/flow_runs/filter", "POST")
    assert _raw(*query, {"Content-Type": "application/json"}, b"{}")[0] == 401
    assert _raw(*query, {"Content-Type": "application/json", "Host": "evil.example"}, b"{}")[0] == 401
    assert _raw(*query, {"Content-Type": "application/json", **basic}, b"{}")[0] == 200
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    _, foreign = _raw(query[0], "OPTIONS", {**preflight, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in {k.lower() for k in foreign}, foreign
    own = base.replace("/api", "")
    _, allowed = _raw(query[0], "OPTIONS", {**preflight, "Origin": own})
    assert {k.lower(): v for k, v in allowed.items()}.get("access-control-allow-origin") == own, allowed
    assert (stack["home"] / kd_stack.API_AUTH_FILE).stat().st_mode & 0o077 == 0  # the secret is the user's alone


def test_stack_stops_cleanly(stack):
    """Ctrl-C on `make serve`: every process it started is gone and the ports are free."""
    proc = stack["proc"]
    assert proc.poll() is None, stack["diagnostics"]()
    family = kd_stack.descendants(proc.pid)
    assert len(family) >= 3, family  # the two servers and the deployments process, at least
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=STOP_S)
    elapsed = time.monotonic() - started
    assert code == 0, stack["diagnostics"]()
    deadline = time.monotonic() + 10
    while alive_pids(family) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive_pids(family), f"left running: {alive_pids(family)}"
    assert not any(kd_stack.port_in_use(port) for port in stack["ports"])
    print(f"stack stopped in {elapsed:.1f}s")


# --------------------------------------------------------------------------- prefect.yaml + a worker


def test_prefect_yaml_deploys_and_a_kd_cpu_worker_runs_it(tmp_path, kd_data_dir):
    from flows.registry import FLOW_NAMES

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    declared = {(d["flow_name"], d["name"]): d["work_pool"]["name"] for d in spec["deployments"]}
    for flow in FLOW_NAMES:
        assert declared.get((flow, "default")) == "kd-cpu", f"prefect.yaml has no {flow}/default on kd-cpu"
    assert "kd-gpu" in declared.values()

    home = tmp_path / "kd_home"
    home.mkdir()
    env = base_env(home, kd_data_dir, tmp_path / "prefect_home")
    port = kd_stack.free_port()
    api = f"http://127.0.0.1:{port}/api"
    server = kd_stack.prefect_server(port, tmp_path / "server_home", tmp_path / "server.log", ui=False)
    worker = kd_stack.Service(
        "worker", [kd_stack.tool("prefect"), "worker", "start", "--pool", "kd-cpu", "--type", "process"],
        {**env, "PREFECT_API_URL": api}, tmp_path / "worker.log", stop_signal=signal.SIGINT,
    )

    def diagnostics() -> str:
        return "\n".join(tail(p) for p in (tmp_path / "server.log", tmp_path / "worker.log"))

    cli_env = {**env, "PREFECT_API_URL": api, "PWD": str(REPO)}
    try:
        server.start()
        kd_stack.wait_http(f"{api}/health", server, 120, "Prefect server")
        prefect_cli(cli_env, "work-pool", "create", "kd-cpu", "--type", "process", "--overwrite")
        prefect_cli(cli_env, "work-pool", "create", "kd-gpu", "--type", "process", "--overwrite")
        prefect_cli(cli_env, "--no-prompt", "deploy", "--all", timeout=180)
        deployments = kd_stack.http_json(f"{api}/deployments/filter", {})
        assert {(d["name"], d["work_pool_name"]) for d in deployments} >= {("default", "kd-cpu"), ("gpu", "kd-gpu")}
        for flow, name in declared:
            assert kd_stack.http_json(f"{api}/deployments/name/{flow}/{name}")["work_pool_name"] == declared[(flow, name)]

        worker.start(cwd=tmp_path)  # not the repo: the deployment's pull step and entrypoint find it
        run_id = run_deployment(cli_env, f"{FLOW}/default", "profile=smoke")
        run = wait_flow_run(api, run_id, FLOW_RUN_S, diagnostics)
        assert run["state_type"] == "COMPLETED", f"{run['state_type']}: {run['state']}\n{diagnostics()}"
        assert (home / "artifacts" / "report").is_dir(), "the worker's flow run wrote to the KD_HOME it was given"
    finally:
        worker.stop()
        server.stop()
