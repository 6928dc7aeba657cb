"""The local serving stack behind ``make serve`` and ``make ui`` (stdlib only).

    python scripts/kd_stack.py serve   # Prefect server, MLflow server, then flows/serve.py
    python scripts/kd_stack.py ui      # the MLflow UI alone, over the same store

Everything binds to 127.0.0.1. The MLflow server uses the store the in-process runs use
(``sqlite:///$KD_HOME/mlflow.db``, artifacts under ``$KD_HOME/mlartifacts``), so runs made with
``kd run`` and runs made through the deployments show up side by side. The flow runs get
``PREFECT_API_URL`` and ``MLFLOW_TRACKING_URI`` pointing at these two servers. Ctrl-C (or
SIGTERM) stops the deployments, then MLflow, then Prefect, each as a whole process group.

Ports and knobs (environment): KD_PREFECT_PORT (4200), KD_MLFLOW_PORT (5000), KD_MLFLOW_WORKERS
(1: sqlite wants a single writer), KD_SERVE_LIMIT (concurrent flow runs, default unlimited).
Server logs go to $KD_HOME/logs/. The test suite (tests/test_servers.py) drives the same
functions on free ports.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
LOOPBACK_HOSTS = "localhost,localhost:*,127.0.0.1,127.0.0.1:*"

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def kd_home() -> Path:
    return Path(os.environ.get("KD_HOME") or REPO / "data").resolve()


def sqlite_store(home: Path) -> str:
    return f"sqlite:///{home / 'mlflow.db'}"


def tool(name: str) -> str:
    """The console script next to this interpreter (the venv's), else on PATH."""
    candidate = BIN / name
    return str(candidate) if candidate.exists() else name


def prefect_server_cmd(port: int, ui: bool = True) -> list[str]:
    cmd = [tool("prefect"), "server", "start", "--host", HOST, "--port", str(port)]
    return cmd if ui else cmd + ["--no-ui"]


def mlflow_server_cmd(port: int, backend: str, artifacts: Path, workers: int = 1) -> list[str]:
    return [
        tool("mlflow"), "server",
        "--host", HOST, "--port", str(port),
        "--backend-store-uri", backend,
        "--artifacts-destination", str(artifacts),
        "--allowed-hosts", LOOPBACK_HOSTS,
        "--workers", str(workers),
    ]


def serve_cmd(limit: int | None = None) -> list[str]:
    return [sys.executable, "-m", "flows.serve"] + (["--limit", str(limit)] if limit else [])


@dataclass
class Service:
    """A child process in its own session, so it (and whatever it spawns) stops as one group."""

    name: str
    cmd: list[str]
    env: dict[str, str | None] = field(default_factory=dict)  # None: remove the variable
    log: Path | None = None
    stop_signal: int = signal.SIGTERM
    proc: subprocess.Popen | None = None

    def start(self, cwd: Path = REPO) -> "Service":
        out = open(self.log, "ab") if self.log else None
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=cwd,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                start_new_session=True,
            )
        finally:
            if out:
                out.close()
        return self

    def environment(self) -> dict[str, str]:
        merged = {**os.environ, **QUIET_ENV, **self.env}
        return {key: value for key, value in merged.items() if value is not None}

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe_exit(self) -> str:
        tail = ""
        if self.log and self.log.exists():
            tail = "\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        return f"{self.name} exited with {self.proc.returncode if self.proc else '?'}{tail}"

    def stop(self, timeout: float = 20.0) -> None:
        """Signal the process group, wait, then SIGKILL whatever is left of it and its descendants."""
        if self.proc is None:
            return
        pid = self.proc.pid
        family = descendants(pid)
        if self.proc.poll() is None:
            _signal_group(pid, self.stop_signal)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        # Whatever outlived the leader, in its group or not (each checked to be the same process).
        _signal_group(pid, signal.SIGKILL)
        for child in family:
            _kill(child, signal.SIGKILL)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, ...]; None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _signal_group(pgid: int, sig: int) -> None:
    """Signal a process group we created, only while some process is still in it."""
    if not any(stat[2] == str(pgid) for stat in map(_proc_stat, _pids()) if stat):
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill(proc: tuple[int, str], sig: int) -> None:
    """Signal (pid, start time) only if that pid is still the same process."""
    pid, started = proc
    stat = _proc_stat(pid)
    if stat is None or stat[19] != started:
        return
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def descendants(pid: int) -> list[tuple[int, str]]:
    """Live descendants of ``pid`` as (pid, start time), from /proc (Linux)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for child in _pids():
        stat = _proc_stat(child)
        if stat:
            children.setdefault(int(stat[1]), []).append((child, stat[19]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def http_json(url: str, payload: dict | None = None, timeout: float = 10.0, method: str | None = None,
              auth: str | None = None):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    request.add_header("Content-Type", "application/json")
    if auth:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def wait_http(url: str, service: Service | None = None, timeout: float = 90.0, what: str = "",
              auth: str | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if ``service`` dies."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if service is not None and not service.running():
            raise RuntimeError(service.describe_exit())
        try:
            request = urllib.request.Request(url)
            if auth:
                import base64

                request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"{what or url} not up after {timeout:.0f}s (last error: {last})")


API_AUTH_FILE = "prefect-api-auth"


def api_auth(home: Path) -> str:
    """The Prefect API's basic-auth string for this KD_HOME (``kd:<random>``), made once, mode 0600."""
    path = home / API_AUTH_FILE
    if not path.is_file():
        import secrets

        home.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"kd:{secrets.token_urlsafe(24)}\n")
    return path.read_text().strip()


def prefect_server(port: int, home: Path | None = None, log: Path | None = None, ui: bool = True,
                   auth: str | None = None) -> Service:
    origins = f"http://{HOST}:{port},http://localhost:{port}"
    env: dict[str, str | None] = {
        "PREFECT_API_URL": None,  # the server must not point at another API
        # the UI calls the API it is served with, on this port (it defaulted to 4200)
        "PREFECT_SERVER_UI_API_URL": f"http://{HOST}:{port}/api",
        # only the UI's own pages may call the API from a browser (the default was any origin)
        "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": origins,
        "PREFECT_SERVER_CORS_ALLOWED_METHODS": "GET,POST,PUT,PATCH,DELETE,OPTIONS",
        "PREFECT_SERVER_CORS_ALLOWED_HEADERS": "Authorization,Content-Type,X-CSRF-Token,X-Prefect-Csrf-Token",
    }
    if auth:
        # Prefect has no allowed-hosts check: a page on another origin (or DNS rebinding) can
        # still reach 127.0.0.1, so every API call needs this secret
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth
    if home is not None:
        env["PREFECT_HOME"] = str(home)
    return Service("prefect-server", prefect_server_cmd(port, ui), env, log)


def mlflow_server(port: int, backend: str, artifacts: Path, log: Path | None = None, workers: int = 1) -> Service:
    artifacts.mkdir(parents=True, exist_ok=True)
    # No MLflow job runner (GenAI jobs): it forks ~8 huey consumers that are slow to stop.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return Service("mlflow-server", mlflow_server_cmd(port, backend, artifacts, workers), env, log)


def bootstrap_store(home: Path, timeout: float = 120.0) -> None:
    """Create the sqlite store and the kd-pipeline experiment the way ``kd run`` does.

    An experiment created through the server gets an ``mlflow-artifacts:/`` location, which
    in-process runs on ``sqlite:///`` (``kd run`` without a server) cannot resolve. Created
    here first, it gets ``file://$KD_HOME/mlartifacts`` (same folder as --artifacts-destination),
    and both kinds of run keep working on one store.
    """
    env = {**os.environ, **QUIET_ENV, "KD_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(
        [sys.executable, "-c", "from tasks.tracking import setup_tracking; setup_tracking()"],
        cwd=REPO, env=env, check=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def stop_all(services: list[Service]) -> None:
    for service in reversed(services):
        if service.proc is not None:
            print(f"stopping {service.name}", flush=True)
        service.stop()


class _Terminate(Exception):
    pass


def _raise_terminate(*_):
    raise _Terminate()


def serve(args) -> int:
    home = kd_home()
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    prefect_port, mlflow_port = args.prefect_port, args.mlflow_port
    for port in (prefect_port, mlflow_port):
        if port_in_use(port):
            print(f"port {HOST}:{port} is taken (another make serve / make ui?); set KD_PREFECT_PORT / KD_MLFLOW_PORT", file=sys.stderr)
            return 1
    api_url = f"http://{HOST}:{prefect_port}/api"
    tracking = f"http://{HOST}:{mlflow_port}"
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, _raise_terminate)
    services: list[Service] = []
    try:
        auth = api_auth(home)
        prefect = prefect_server(prefect_port, home / "prefect", logs / "prefect-server.log", auth=auth).start()
        services.append(prefect)
        bootstrap_store(home)  # while the Prefect server starts
        mlflow = mlflow_server(mlflow_port, sqlite_store(home), home / "mlartifacts", logs / "mlflow-server.log",
                               args.mlflow_workers).start()
        services.append(mlflow)
        wait_http(f"{api_url}/health", prefect, args.timeout, "Prefect server", auth=auth)
        wait_http(f"{tracking}/health", mlflow, args.timeout, "MLflow server")
        print(f"Prefect server  http://{HOST}:{prefect_port}   (log {logs / 'prefect-server.log'})")
        print(f"MLflow server   {tracking}   (log {logs / 'mlflow-server.log'})")
        print("From another shell:")
        print(f"  export PREFECT_API_URL={api_url}")
        print(f'  export PREFECT_API_AUTH_STRING="$(cat {home / API_AUTH_FILE})"')
        print("  .venv/bin/prefect deployment run tinybert-full/default -p profile=smoke", flush=True)
        runner = Service(
            "deployments",
            serve_cmd(args.limit),
            {"PREFECT_API_URL": api_url, "PREFECT_API_AUTH_STRING": auth, "MLFLOW_TRACKING_URI": tracking, "KD_HOME": str(home)},
            stop_signal=signal.SIGINT,  # prefect.serve's clean exit (its SIGTERM path warns)
        ).start()
        services.append(runner)
        while all(s.running() for s in services):
            time.sleep(1)
        dead = next(s for s in services if not s.running())
        print(dead.describe_exit(), file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Terminate):
        print("\nshutting down", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        stop_all(services)


def ui(args) -> int:
    home = kd_home()
    if port_in_use(args.mlflow_port):
        print(f"port {HOST}:{args.mlflow_port} is taken (make serve already serves the UI there?)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_terminate)
    service = mlflow_server(args.mlflow_port, sqlite_store(home), home / "mlartifacts", None, args.mlflow_workers)
    print(f"MLflow UI on http://{HOST}:{args.mlflow_port} over {sqlite_store(home)} (Ctrl-C stops it)", flush=True)
    try:
        service.start()
        return service.proc.wait()
    except (KeyboardInterrupt, _Terminate):
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        service.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="kd-pipeline's local Prefect + MLflow stack")
    parser.add_argument("command", choices=["serve", "ui"])
    parser.add_argument("--prefect-port", type=int, default=int(os.environ.get("KD_PREFECT_PORT", 4200)))
    parser.add_argument("--mlflow-port", type=int, default=int(os.environ.get("KD_MLFLOW_PORT", 5000)))
    parser.add_argument("--mlflow-workers", type=int, default=int(os.environ.get("KD_MLFLOW_WORKERS", 1)))
    parser.add_argument("--limit", type=int, default=int(os.environ.get("KD_SERVE_LIMIT", 0)) or None)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each server")
    args = parser.parse_args(argv)
    return serve(args) if args.command == "serve" else ui(args)


if __name__ == "__main__":
    sys.exit(main())
