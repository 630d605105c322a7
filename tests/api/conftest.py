"""Fixtures for the control API: settings under tmp_path, certificates, a live server."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from chatmail_api.app import create_app
from chatmail_api.settings import Settings, parse_settings

MONITOR_TOKEN = "monitor-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789ab"
MONITOR = {"Authorization": f"Bearer {MONITOR_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def make_cert(
    path: Path, days: float, names: list[str], key_path: Path | None = None
) -> Path:
    """A self-signed certificate valid for ``days`` more days (negative: expired)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key_path is not None:
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        bindir = tmp_path / "bin"
        bindir.mkdir(exist_ok=True)
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
        config = make_config("chat.example.org", **(config_overrides or {}))
        cert = tmp_path / "cert.pem"
        if not cert.exists():
            make_cert(cert, 60, ["chat.example.org"])
        version = tmp_path / "chatmail-version"
        version.write_text("abc1234\n")
        data = {
            "chatmail_ini": str(tmp_path / "chatmail.ini"),
            "state_dir": str(tmp_path / "api-state"),
            "tokens": {"monitor": {"grafana": MONITOR_TOKEN}, "admin": {"alice": ADMIN_TOKEN}},
            "version_file": str(version),
            "tls_cert": str(cert),
            "services": [],
            "ports": [{"port": listening_port, "what": "test service"}],
            "queue_command": fake_postqueue([]),
            "disk_warn_mb": 0,
            "status_cache_s": 5,
            "account_scan_interval_s": 0,
            "dns": {"check_interval_s": 0},
            "probe": {"enabled": False},
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
            [sys.executable, "-m", "chatmail_api.main", "--settings", str(path),
             "--log-level", "warning"],
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
