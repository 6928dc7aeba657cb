"""`kd run`'s ephemeral Prefect server, started before the heavy imports.

Prefect starts its ephemeral server only when the flow is called: it imports the server app in
this process (about 4 s) and then waits for the uvicorn subprocess to boot (about 5 s more). Here
the same subprocess, with the same settings Prefect gives it, is spawned first, before torch,
transformers and MLflow are imported, so its boot overlaps theirs on another core. This
process then talks to it as to any served API (PREFECT_API_URL), and stops it at exit.

Nothing here imports Prefect: its settings are read once, on first import, and must already see
the URL.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

# set while this process runs on its own ephemeral server (flows.run: no UI links to it)
EPHEMERAL_MARK = "KD_EPHEMERAL_PREFECT_URL"


def configured_api_url() -> str | None:
    """The API a user chose: PREFECT_API_URL, or the active Prefect profile's."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    profiles_path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        profiles = tomllib.loads(profiles_path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return (profiles.get("profiles", {}).get(active) or {}).get("PREFECT_API_URL") or None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EphemeralServer:
    """One uvicorn process serving Prefect's API on a free loopback port, like Prefect's own
    SubprocessASGIServer (the reaper in flows.console finds it by the same marks)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.url: str | None = None

    def start(self) -> None:
        prefect_dir = Path(importlib.util.find_spec("prefect").submodule_search_locations[0])
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}/api"
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL,
        )
        # registered before Prefect is imported: atexit runs last-in first-out, so Prefect's log
        # and event workers flush into the server before it stops
        atexit.register(self.stop)
        os.environ["PREFECT_API_URL"] = self.url
        os.environ[EPHEMERAL_MARK] = self.url
        os.environ.setdefault("PREFECT_UI_URL", "")  # it serves no UI: no "View at" links to it

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the API answers /health; raise with the exit code if the process died."""
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"the ephemeral Prefect server exited with code {code} before it answered")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the ephemeral Prefect server at {self.url} did not answer within {timeout_s:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None:
            return
        process, self.process = self.process, None
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if os.environ.get(EPHEMERAL_MARK) == self.url:
            os.environ.pop(EPHEMERAL_MARK, None)
            os.environ.pop("PREFECT_API_URL", None)


def start_early() -> EphemeralServer | None:
    """Spawn the server unless a Prefect API is configured (or Prefect is already imported, whose
    settings could no longer see it, or KD_PREFECT_EARLY_SERVER=0 asks for Prefect's own
    ephemeral server). Returns it, or None when Prefect's own handling applies."""
    if configured_api_url() or "prefect" in sys.modules or os.environ.get("KD_PREFECT_EARLY_SERVER") == "0":
        return None
    server = EphemeralServer()
    server.start()
    return server
