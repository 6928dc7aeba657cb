"""The docker-compose stack on this host: daemon, images, services (stdlib only).

    python scripts/compose_stack.py env              # .env with generated credentials (once)
    python scripts/compose_stack.py up               # make compose-up
    python scripts/compose_stack.py status
    python scripts/compose_stack.py down [--volumes] # make compose-down

``up`` does, in order, only what is missing:
1. the Docker daemon: when none answers, it starts ``dockerd --iptables=false --ip6tables=false
   --bridge=none`` (root only; ``--data-root $KD_DOCKER_DATA_ROOT`` when set) and records its
   pid in .compose/, so ``down`` stops it and nothing else;
2. the mode: ``upstream`` (docker-compose.yml alone, Docker Hub images, a bridge network) when
   the daemon has a bridge and Docker Hub answers, else ``local`` (plus
   docker-compose.local.yml: host networking, images built here). ``--mode`` forces one;
3. in local mode, the base image kd-base:bookworm: ``debootstrap --variant=minbase bookworm``
   from the Debian mirror (KD_DEBIAN_MIRROR), imported with ``docker import``;
4. the images: kd-pipeline:cpu from the Dockerfile (and kd-postgres:15 in local mode), with the
   host's CA bundle and torch wheel in docker/local/ when the host has them;
5. ``docker-compose up -d``, then it waits for Prefect and MLflow to answer and for the one-shot
   ``deployments`` service to finish registering prefect.yaml.

Credentials come from .env (``env`` writes one, mode 600, with random POSTGRES_PASSWORD and
PREFECT_API_AUTH_STRING); KD_COMPOSE_ENV_FILE points at another file, KD_COMPOSE_PROJECT names
the compose project (default kd-pipeline). tests/test_compose_stack.py drives these functions.
"""

from __future__ import annotations

import argparse
import glob
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kd_stack  # noqa: E402  (the sibling script: http_json, wait_http)

REPO = Path(__file__).resolve().parents[1]
STATE = REPO / ".compose"  # the daemon this script started (pid, log) and the mode it chose
LOCAL_CONTEXT = REPO / "docker" / "local"
BASE_IMAGE = "kd-base:bookworm"
CPU_IMAGE = "kd-pipeline:cpu"
POSTGRES_IMAGE = "kd-postgres:15"
UPSTREAM_PROBE = "python:3.11-slim"  # the Dockerfile's default base
TORCH_WHEEL = "torch-2.13.0*-cp311-cp311-*.whl"  # both bases run Python 3.11
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PREFECT_URL = "http://127.0.0.1:4200"
MLFLOW_URL = "http://127.0.0.1:5000"
LOCAL_PORTS = {"postgres": 5432, "prefect-server": 4200, "mlflow": 5000}


class StackError(RuntimeError):
    """A step of ``up``/``down`` that cannot go on; the message says what to do."""


def say(message: str) -> None:
    print(f"compose-stack: {message}", flush=True)


def run(args: list[str], check: bool = True, capture: bool = False, timeout: float | None = None,
        **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(args, text=True, capture_output=capture, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout or "").strip()[-2000:] if capture else ""
        raise StackError(f"`{' '.join(args)}` failed with exit code {done.returncode}" + (f":\n{detail}" if detail else ""))
    return done


# --------------------------------------------------------------------------- the daemon


def daemon_running() -> bool:
    try:
        return run(["docker", "info", "--format", "{{.ServerVersion}}"], check=False, capture=True, timeout=20).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


def _started_pid() -> int | None:
    try:
        pid = int((STATE / "dockerd.pid").read_text())
    except (OSError, ValueError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return None
    return pid if cmdline.endswith(b"dockerd") else None


def ensure_daemon(timeout: float = 90.0) -> bool:
    """True when this call started the daemon."""
    if daemon_running():
        return False
    if shutil.which("docker") is None or shutil.which("dockerd") is None:
        raise StackError("no Docker daemon answers and docker/dockerd are not installed: apt-get install docker.io docker-compose")
    if os.geteuid() != 0:
        raise StackError("no Docker daemon answers; start it (sudo systemctl start docker) or run this as root")
    STATE.mkdir(exist_ok=True)
    cmd = ["dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none", "--pidfile", str(STATE / "dockerd.run.pid")]
    if os.environ.get("KD_DOCKER_DATA_ROOT"):
        cmd += ["--data-root", os.environ["KD_DOCKER_DATA_ROOT"]]
    log = open(STATE / "dockerd.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    (STATE / "dockerd.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"dockerd exited with {proc.returncode}; see {STATE / 'dockerd.log'}")
        if daemon_running():
            say(f"started dockerd (pid {proc.pid}, no bridge, no iptables; log {STATE / 'dockerd.log'})")
            return True
        time.sleep(1)
    raise StackError(f"dockerd did not answer within {timeout:.0f}s; see {STATE / 'dockerd.log'}")


def stop_daemon(timeout: float = 60.0) -> bool:
    """Stop the daemon only if this script started it; True when it did."""
    pid = _started_pid()
    if pid is None:
        (STATE / "dockerd.pid").unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        try:  # reap it when it is our child (a test that started it in-process)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.5)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)
    (STATE / "dockerd.pid").unlink(missing_ok=True)
    say(f"stopped the dockerd this script started (pid {pid})")
    return True


# --------------------------------------------------------------------------- mode and images


def image_exists(name: str) -> bool:
    return run(["docker", "image", "inspect", name], check=False, capture=True).returncode == 0


def daemon_has_bridge() -> bool:
    done = run(["docker", "network", "inspect", "bridge"], check=False, capture=True)
    return done.returncode == 0


def choose_mode(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if not daemon_has_bridge():
        return "local"
    if image_exists(UPSTREAM_PROBE):
        return "upstream"
    pulled = run(["docker", "pull", "-q", UPSTREAM_PROBE], check=False, capture=True, timeout=600)
    return "upstream" if pulled.returncode == 0 else "local"


def ensure_base_image(mirror: str | None = None) -> None:
    """kd-base:bookworm: a minimal Debian, from the mirror apt uses, for hosts without Docker Hub."""
    if image_exists(BASE_IMAGE):
        return
    mirror = mirror or os.environ.get("KD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    if shutil.which("debootstrap") is None:
        if os.geteuid() != 0:
            raise StackError("the base image needs debootstrap: sudo apt-get install debootstrap")
        say("installing debootstrap (apt-get)")
        run(["apt-get", "install", "-y", "-q", "debootstrap"], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kd-base-") as root:
        say(f"debootstrap --variant=minbase bookworm from {mirror} (about a minute)")
        run(["debootstrap", "--variant=minbase", "bookworm", root, mirror], capture=True)
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        done = subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, capture_output=True, text=True)
        tar.stdout.close()
        tar.wait()
        if tar.returncode or done.returncode:
            raise StackError(f"docker import of {BASE_IMAGE} failed: {done.stderr.strip()}")
    say(f"built {BASE_IMAGE} in {time.monotonic() - started:.0f}s")


def _wheel_dirs() -> list[str]:
    dirs = [d for d in os.environ.get("PIP_FIND_LINKS", "").split() if d]
    for key in ("global.find-links", "install.find-links"):
        done = run([sys.executable, "-m", "pip", "config", "get", key], check=False, capture=True)
        if done.returncode == 0:
            dirs += done.stdout.split()
    return [d.removeprefix("file://") for d in dirs + ["/opt/wheels"]]


def fill_local_context() -> list[str]:
    """docker/local/: the host's CA bundle and torch wheel, where the host has them."""
    LOCAL_CONTEXT.mkdir(parents=True, exist_ok=True)
    filled = []
    bundle = LOCAL_CONTEXT / "ca-bundle.crt"
    if HOST_CA_BUNDLE.is_file():
        shutil.copyfile(HOST_CA_BUNDLE, bundle)
        filled.append(bundle.name)
    wheels = LOCAL_CONTEXT / "wheels"
    for directory in _wheel_dirs():
        found = sorted(glob.glob(os.path.join(directory, TORCH_WHEEL)))
        found = [f for f in found if "+cpu" in f] or found
        if found:
            wheels.mkdir(exist_ok=True)
            target = wheels / Path(found[0]).name
            if not target.exists():
                try:
                    os.link(found[0], target)
                except OSError:
                    shutil.copyfile(found[0], target)
            filled.append(f"wheels/{target.name}")
            break
    return filled


def build_images(mode: str) -> dict[str, float]:
    """Build what the chosen mode needs; returns seconds per image (layers cached by the daemon)."""
    seconds: dict[str, float] = {}
    filled = fill_local_context()
    if filled:
        say(f"docker/local/: {', '.join(filled)}")
    if mode == "local":
        builds = [
            (POSTGRES_IMAGE, ["-f", "docker/postgres.Dockerfile"]),
            (CPU_IMAGE, []),
        ]
        for image, extra in builds:
            started = time.monotonic()
            say(f"building {image}")
            run(["docker", "build", "--network", "host", "-t", image, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", *extra, "."],
                cwd=REPO)
            seconds[image] = round(time.monotonic() - started, 1)
    else:
        started = time.monotonic()
        compose(mode, "build")
        seconds[CPU_IMAGE] = round(time.monotonic() - started, 1)
    return seconds


# --------------------------------------------------------------------------- compose


def env_file() -> Path:
    return Path(os.environ.get("KD_COMPOSE_ENV_FILE") or REPO / ".env")


def write_env(path: Path | None = None) -> Path:
    """Generated credentials, once; an existing file is left as it is."""
    path = path or env_file()
    if path.exists():
        return path
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(
            "# kd-pipeline's compose credentials, generated by scripts/compose_stack.py. Keep this file\n"
            "# private (mode 600, git-ignored). Changing POSTGRES_PASSWORD later needs a fresh postgres volume.\n"
            f"POSTGRES_PASSWORD={secrets.token_urlsafe(24)}\n"
            f"PREFECT_API_AUTH_STRING=kd:{secrets.token_urlsafe(24)}\n"
        )
    say(f"wrote {path} (generated credentials, mode 600)")
    return path


def read_env(path: Path | None = None) -> dict[str, str]:
    values = {}
    for line in (path or env_file()).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def compose_files(mode: str) -> list[str]:
    files = ["-f", "docker-compose.yml"]
    return files + ["-f", "docker-compose.local.yml" if mode == "local" else "docker-compose.override.yml"]


def project() -> str:
    return os.environ.get("KD_COMPOSE_PROJECT", "kd-pipeline")


def compose(mode: str, *args: str, capture: bool = False, check: bool = True, timeout: float | None = None):
    cmd = ["docker-compose", "--env-file", str(env_file()), "-p", project(), *compose_files(mode), *args]
    return run(cmd, cwd=REPO, capture=capture, check=check, timeout=timeout)


def container(mode: str, service: str) -> str | None:
    ids = compose(mode, "ps", "-a", "-q", service, capture=True, check=False).stdout.split()
    return ids[0] if ids else None


def inspect(container_id: str, template: str) -> str:
    return run(["docker", "inspect", "--format", template, container_id], capture=True).stdout.strip()


def logs(mode: str, service: str, lines: int = 40) -> str:
    done = compose(mode, "logs", "--no-color", "--tail", str(lines), service, capture=True, check=False)
    return done.stdout + done.stderr


def wait_ready(mode: str, timeout: float = 300.0) -> None:
    """Prefect and MLflow answer, and the deployments job exited 0."""
    auth = read_env().get("PREFECT_API_AUTH_STRING")
    deadline = time.monotonic() + timeout
    kd_stack.wait_http(f"{PREFECT_URL}/api/health", timeout=timeout, what="the Prefect server", auth=auth)
    kd_stack.wait_http(f"{MLFLOW_URL}/health", timeout=max(1.0, deadline - time.monotonic()), what="the MLflow server")
    while time.monotonic() < deadline:
        cid = container(mode, "deployments")
        if cid and inspect(cid, "{{.State.Status}}") == "exited":
            code = inspect(cid, "{{.State.ExitCode}}")
            if code != "0":
                raise StackError(f"the deployments job exited with {code}:\n{logs(mode, 'deployments')}")
            return
        time.sleep(2)
    raise StackError(f"the deployments job did not finish within {timeout:.0f}s:\n{logs(mode, 'deployments')}")


def check_ports(mode: str) -> None:
    """In local mode the servers bind the host's ports: fail before starting if another process has them."""
    if mode != "local":
        return
    ours = {service for service in LOCAL_PORTS if (cid := container(mode, service)) and inspect(cid, "{{.State.Running}}") == "true"}
    for service, port in LOCAL_PORTS.items():
        if service not in ours and kd_stack.port_in_use(port):
            raise StackError(f"port 127.0.0.1:{port} ({service}) is taken by another process; stop it (make serve? "
                             f"another compose project?) and retry")


def up(mode: str = "auto", build: bool = True, timeout: float = 600.0) -> dict:
    timings: dict = {}
    started = time.monotonic()
    timings["started_daemon"] = ensure_daemon()
    mode = choose_mode(mode)
    STATE.mkdir(exist_ok=True)
    (STATE / "mode").write_text(mode)
    say(f"mode: {mode}")
    write_env()
    if mode == "local":
        t0 = time.monotonic()
        ensure_base_image()
        timings["base_image_s"] = round(time.monotonic() - t0, 1)
    if build:
        timings["build_s"] = build_images(mode)
    check_ports(mode)
    t0 = time.monotonic()
    compose(mode, "up", "-d", "--no-build")
    wait_ready(mode, timeout=timeout)
    timings["up_s"] = round(time.monotonic() - t0, 1)
    timings["total_s"] = round(time.monotonic() - started, 1)
    say(f"up in {timings['up_s']}s: Prefect {PREFECT_URL} (login: PREFECT_API_AUTH_STRING in {env_file()}), MLflow {MLFLOW_URL}")
    return {"mode": mode, **timings}


def saved_mode() -> str:
    try:
        return (STATE / "mode").read_text().strip() or "local"
    except OSError:
        return "local"


def down(volumes: bool = False, keep_daemon: bool = False) -> None:
    if daemon_running() and env_file().exists():
        compose(saved_mode(), "down", *(["--volumes"] if volumes else []))
    if not keep_daemon:
        stop_daemon()


def status() -> int:
    if not daemon_running():
        say("no Docker daemon answers")
        return 1
    compose(saved_mode(), "ps")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="write .env with generated credentials (kept when it exists)")
    p_up = sub.add_parser("up", help="daemon, images, then the stack; waits until it is ready")
    p_up.add_argument("--mode", choices=["auto", "local", "upstream"], default="auto")
    p_up.add_argument("--no-build", action="store_true", help="use the images as they are")
    p_down = sub.add_parser("down", help="stop the stack (and the daemon if up started it)")
    p_down.add_argument("--volumes", action="store_true", help="also delete the stack's volumes: runs, artifacts, database")
    p_down.add_argument("--keep-daemon", action="store_true")
    sub.add_parser("status")
    args = parser.parse_args(argv)
    try:
        if args.command == "env":
            write_env()
        elif args.command == "up":
            up(args.mode, build=not args.no_build)
        elif args.command == "down":
            down(volumes=args.volumes, keep_daemon=args.keep_daemon)
        else:
            return status()
    except (StackError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
