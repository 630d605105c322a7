"""PUT /account-creation as a real doveauth sees it: refused, allowed, re-opened by until."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from api_support import ADMIN, MONITOR

from chatmaild.dictproxy import DictClient


def passdb_key(addr: str, password: str) -> str:
    return f'shared/passdb/{password}"{addr}'


@pytest.fixture
def doveauth(tmp_path: Path):
    """``doveauth SOCKET INI`` on the ini the API uses (start it after the API's fixture)."""
    procs = []

    def start() -> Path:
        socket_path = tmp_path / "run" / "doveauth.socket"
        socket_path.parent.mkdir()
        exe = Path(sys.executable).parent / "doveauth"
        proc = subprocess.Popen(
            [str(exe), str(socket_path), str(tmp_path / "chatmail.ini")],
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        return socket_path

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def login(socket_path: Path, addr: str) -> bool:
    """A first login: True if doveauth created (or knows) the account."""
    with DictClient(socket_path) as client:
        return client.lookup(passdb_key(addr, "password-123"), addr) is not None


def test_toggle_seen_by_doveauth(live_api, doveauth):
    url = live_api(reopen_interval_s=0.2)
    socket_path = doveauth()
    domain = "chat.example.org"

    closed = httpx.put(
        f"{url}/account-creation", headers=ADMIN, json={"enabled": False, "reason": "spam"}
    )
    assert closed.status_code == 200
    assert not login(socket_path, f"refused01@{domain}")

    assert httpx.put(f"{url}/account-creation", headers=ADMIN, json={"enabled": True}).json()[
        "enabled"
    ]
    assert login(socket_path, f"allowed01@{domain}")

    until = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat()
    httpx.put(
        f"{url}/account-creation",
        headers=ADMIN,
        json={"enabled": False, "reason": "short break", "until": until},
    )
    assert not login(socket_path, f"refused02@{domain}")
    assert login(socket_path, f"allowed01@{domain}")  # existing accounts keep working
    time.sleep(2.0)  # no request to the API: its background task re-opens
    assert login(socket_path, f"allowed02@{domain}")

    # doveauth's counters reach /metrics (flushed within about a second)
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"{url}/metrics", headers=MONITOR).text
        if 'chatmail_registrations_rejected_total{reason="nocreate"} 2.0' in text:
            break
        time.sleep(0.3)
    assert 'chatmail_registrations_rejected_total{reason="nocreate"} 2.0' in text
    assert "chatmail_accounts_created_total 2.0" in text
    status = httpx.get(f"{url}/status", headers=MONITOR).json()
    registration = {c["id"]: c for c in status["checks"]}["registration.open"]
    assert registration["state"] == "ok"
