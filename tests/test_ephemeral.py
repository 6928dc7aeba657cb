"""flows.ephemeral: `kd run`'s own ephemeral Prefect server, and the `kd` script's exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]


def _servers_for(home: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "prefect.server.api.server:create_app" in " ".join(proc.info["cmdline"] or []) and \
                    proc.environ().get("KD_HOME") == str(home):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_a_configured_api_is_used_as_it_is(tmp_path, monkeypatch):
    from flows.ephemeral import configured_api_url, start_early

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    assert configured_api_url() is None  # no profiles file
    (tmp_path / "profiles.toml").write_text(
        'active = "served"\n[profiles.served]\nPREFECT_API_URL = "http://127.0.0.1:4321/api"\n[profiles.ephemeral]\n')
    assert configured_api_url() == "http://127.0.0.1:4321/api"
    monkeypatch.setenv("PREFECT_PROFILE", "ephemeral")
    assert configured_api_url() is None
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9999/api")
    assert configured_api_url() == "http://127.0.0.1:9999/api"
    assert start_early() is None  # nothing spawned over a user's server


def test_the_server_answers_on_loopback_and_stops_with_its_settings_undone(tmp_path, monkeypatch):
    from flows.ephemeral import EPHEMERAL_MARK, EphemeralServer

    monkeypatch.setenv("KD_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_UI_URL", raising=False)
    server = EphemeralServer()
    server.start()
    try:
        assert os.environ["PREFECT_API_URL"] == server.url == os.environ[EPHEMERAL_MARK]
        assert server.url.startswith("http://127.0.0.1:")
        assert os.environ["PREFECT_UI_URL"] == ""  # it serves no UI: Prefect prints no "View at" link
        server.wait_ready(timeout_s=90)
        with urllib.request.urlopen(f"{server.url}/health", timeout=5) as response:
            assert response.status == 200 and json.loads(response.read()) is True
        (proc,) = _servers_for(tmp_path)
        # what flows.console's reaper recognises after a kill -9 of the command
        assert proc.environ()["PREFECT__SERVER_EPHEMERAL"] == "1" and proc.ppid() == os.getpid()
    finally:
        server.stop()
    assert not _servers_for(tmp_path)
    assert "PREFECT_API_URL" not in os.environ and EPHEMERAL_MARK not in os.environ


def test_the_kd_script_keeps_exit_codes_and_leaves_no_server(tmp_path, kd_data_dir):
    """The console script ends with os._exit after the atexit handlers: the code must survive it,
    and the server spawned before the graph check is stopped on a config error too."""
    kd = Path(sys.executable).with_name("kd")
    if not kd.is_file():
        pytest.fail(f"{kd} is missing: the package is not installed in this venv (make setup)")
    env = {**os.environ, "KD_HOME": str(tmp_path), "KD_DATA_DIR": str(kd_data_dir)}
    env.pop("PREFECT_API_URL", None)
    typo = subprocess.run([str(kd), "run", "tinybert-full", "--profile", "smoke", "-p", "force=[task_distil]"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert typo.returncode == 2 and "unknown stage 'task_distil'" in typo.stdout + typo.stderr
    assert not _servers_for(tmp_path)
    version = subprocess.run([str(kd), "version"], capture_output=True, text=True, env=env, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == "0.1.0"
    missing = subprocess.run([str(kd), "no-such-command"], capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 2 and "No such command" in missing.stdout + missing.stderr
