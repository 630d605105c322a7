"""Fixtures for the control API: settings under tmp_path, certificates, a live server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from api_support import ADMIN_TOKEN, MONITOR_TOKEN, free_port, make_cert
from chatmail_api.app import create_app
from chatmail_api.settings import Settings, parse_settings
from fastapi.testclient import TestClient


@pytest.fixture
def listening_port():
    """A port something listens on (stands in for a service's port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


@pytest.fixture
def fake_postqueue(tmp_path: Path):
    """A ``postqueue`` printing Postfix's -j format (the real one needs a running Postfix)."""

    def make(messages: list[dict]) -> list[str]:
        bindir = tmp_path / f"bin-{len(list(tmp_path.glob('bin-*')))}"
        bindir.mkdir()
        script = bindir / "postqueue"
        lines = "\n".join(json.dumps(m) for m in messages)
        script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{lines}\nEOF\n")
        script.chmod(0o755)
        return [str(script), "-j"]

    return make


@pytest.fixture
def api_settings(tmp_path: Path, make_config, listening_port, fake_postqueue):
    """``build(**overrides) -> (settings, config)`` with everything under tmp_path."""

    def build(config_overrides: dict | None = None, **overrides) -> tuple[Settings, object]:
        # The test host is shared and busy: only tests that mean to trip a limit do.
        limits = {"max_load_1m": 10000, "min_available_memory": "1M", "min_free_disk_space": "1M"}
        config = make_config("chat.example.org", **{**limits, **(config_overrides or {})})
        cert = tmp_path / "cert.pem"
        if not cert.exists():
            make_cert(cert, 60, ["chat.example.org"])
        version = tmp_path / "chatmail-version"
        version.write_text("abc1234\n")
        # What salt/chatmail/api renders into api.json, pointed at tmp_path.
        data = {
            "chatmail_ini": str(tmp_path / "chatmail.ini"),
            "listen": "127.0.0.1",
            "port": 8077,
            "state_dir": str(tmp_path / "api-state"),
            "tokens": {"monitor": {"grafana": MONITOR_TOKEN}, "admin": {"alice": ADMIN_TOKEN}},
            "version_file": str(version),
            "tls_cert": str(cert),
            "service_manager": "systemd",
            "mta": "postfix",
            "services": [],
            "ports": [{"port": listening_port, "what": "test service"}],
            "queue_command": fake_postqueue([]),
            "disk_warn_mb": 0,
            "status_cache_s": 5,
            "account_scan_interval_s": 0,
            "account_stats_file": None,
            "dns": {
                "check_interval_s": 0,
                "dkim_selector": "opendkim",
                "dkim_txt": str(tmp_path / "dkim-public.txt"),
            },
            "probe": {"enabled": False, "interval_s": 0, "submission_port": 587, "imap_port": 993},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return parse_settings(data), config

    return build


@pytest.fixture
def client(api_settings):
    settings, config = api_settings()
    with TestClient(create_app(settings, config)) as test_client:
        yield test_client


@pytest.fixture
def live_api(tmp_path: Path, api_settings):
    """``start(**overrides) -> base_url``: ``chatmail-api --settings`` as a real process."""
    procs = []

    def start(config_overrides: dict | None = None, **overrides) -> str:
        port = free_port()
        settings, _ = api_settings(config_overrides, port=port, **overrides)
        path = tmp_path / "api.json"
        path.write_text(settings.model_dump_json())
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chatmail_api.main",
                "--settings",
                str(path),
                "--log-level",
                "warning",
            ],
            env=env,
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"chatmail-api exited with {proc.returncode}")
            try:
                httpx.get(f"{url}/health", timeout=2)
                return url
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("chatmail-api did not start")

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
