"""GET/PUT /account-creation: closing and re-opening, as the API and as a real doveauth see it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from api_support import ADMIN, MONITOR, checks_by_id
from chatmail_api.app import create_app
from fastapi.testclient import TestClient

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


def audit_lines(settings) -> list[dict]:
    path = settings.audit_log_path
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_close_and_open_account_creation(api_settings):
    settings, config = api_settings()
    with TestClient(create_app(settings, config)) as client:
        assert client.get("/account-creation", headers=MONITOR).json()["enabled"] is True
        response = client.put(
            "/account-creation", headers=ADMIN, json={"enabled": False, "reason": "spam wave"}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["enabled"] is False and body["reason"] == "spam wave"
        assert body["by"] == "alice" and body["since"]
        assert config.nocreate_file.exists()
        stored = json.loads(config.nocreate_file.read_text())
        assert stored["reason"] == "spam wave" and stored["by"] == "alice"

        registration = checks_by_id(client.get("/status", headers=MONITOR).json())[
            "registration.open"
        ]
        assert registration["state"] == "fail" and "spam wave" in registration["summary"]
        assert "closed by alice" in registration["summary"]

        again = client.put(
            "/account-creation", headers=ADMIN, json={"enabled": False, "reason": "spam wave"}
        )
        assert again.json()["since"] == body["since"]
        assert len(audit_lines(settings)) == 1  # idempotent: nothing changed, nothing logged

        opened = client.put("/account-creation", headers=ADMIN, json={"enabled": True})
        assert opened.json()["enabled"] is True
        assert not config.nocreate_file.exists()
        client.put("/account-creation", headers=ADMIN, json={"enabled": True})
        lines = audit_lines(settings)
        assert [line["action"] for line in lines] == ["close", "open"]
        assert all(line["by"] == "alice" for line in lines)
        metrics = client.get("/metrics", headers=MONITOR).text
        assert "chatmail_registration_open 1.0" in metrics


def test_until_reopens(api_settings):
    settings, config = api_settings(reopen_interval_s=0.2)
    with TestClient(create_app(settings, config)) as client:
        until = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
        response = client.put(
            "/account-creation",
            headers=ADMIN,
            json={"enabled": False, "reason": "maintenance", "until": until},
        )
        assert response.status_code == 200, response.text
        assert response.json()["until"]
        assert config.nocreate_file.exists()
        deadline = time.monotonic() + 5
        while config.nocreate_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        # re-opened by the background task, without any request
        assert not config.nocreate_file.exists()
        assert client.get("/account-creation", headers=MONITOR).json()["enabled"] is True
        assert audit_lines(settings)[-1]["action"] == "reopen"


def test_expired_until_reopens_on_read(api_settings):
    settings, config = api_settings()
    config.nocreate_file.write_text(
        json.dumps(
            {
                "written_by": "chatmail-api",
                "reason": "x",
                "by": "bob",
                "since": time.time() - 100,
                "until": time.time() - 1,
            }
        )
    )
    client = TestClient(create_app(settings, config))  # no lifespan: no background task
    assert client.get("/account-creation", headers=MONITOR).json()["enabled"] is True
    assert not config.nocreate_file.exists()


def test_hand_made_nocreate_file(client, api_settings):
    _, config = api_settings()
    config.nocreate_file.write_text("closed for the move to new hardware\n")
    body = client.get("/account-creation", headers=MONITOR).json()
    assert body["enabled"] is False and body["by"] == "file"
    assert body["reason"] == "closed for the move to new hardware"


def test_nocreate_symlink_target_is_replaced(api_settings, tmp_path):
    """The relay's layout: /etc/chatmail-nocreate links into the API's own directory."""
    target_dir = tmp_path / "account-creation"
    target_dir.mkdir()
    link = tmp_path / "etc-chatmail-nocreate"
    link.symlink_to(target_dir / "nocreate")
    settings, config = api_settings({"nocreate_file": link})
    with TestClient(create_app(settings, config)) as client:
        client.put("/account-creation", headers=ADMIN, json={"enabled": False, "reason": "r"})
        assert link.is_symlink() and link.exists()
        assert (target_dir / "nocreate").is_file()
        client.put("/account-creation", headers=ADMIN, json={"enabled": True})
        assert link.is_symlink() and not link.exists()


def test_unwritable_nocreate_is_503(api_settings, tmp_path):
    settings, config = api_settings({"nocreate_file": tmp_path / "no-such-dir" / "nocreate"})
    with TestClient(create_app(settings, config)) as client:
        response = client.put(
            "/account-creation", headers=ADMIN, json={"enabled": False, "reason": "r"}
        )
        assert response.status_code == 503
        assert "cannot write" in response.json()["detail"]


@pytest.mark.parametrize("pin", [True, False], ids=["pinned-open", "pinned-closed"])
def test_pinned_is_409(api_settings, pin):
    settings, config = api_settings(account_creation_pin=pin)
    with TestClient(create_app(settings, config)) as client:
        response = client.put("/account-creation", headers=ADMIN, json={"enabled": True})
        assert response.status_code == 409
        assert "pinned" in response.json()["detail"]
        assert client.get("/account-creation", headers=MONITOR).json()["pinned"] is pin


@pytest.mark.parametrize(
    "body",
    [
        {"enabled": False, "reason": "x", "extra": 1},
        {"enabled": "maybe"},
        {"reason": "no enabled"},
        {"enabled": True, "until": "2999-01-01T00:00:00Z"},
        {"enabled": False, "until": "2001-01-01T00:00:00Z"},
        {"enabled": False, "until": "2999-01-01T00:00:00"},
        {"enabled": False, "until": "tomorrow"},
        {"enabled": False, "reason": "x" * 501},
        [],
        "null",
    ],
    ids=[
        "extra-field",
        "not-bool",
        "no-enabled",
        "until-when-opening",
        "until-past",
        "until-naive",
        "until-garbage",
        "reason-too-long",
        "list",
        "null",
    ],
)
def test_bad_bodies_are_422(client, body):
    response = client.put("/account-creation", headers=ADMIN, json=body)
    assert response.status_code == 422, response.text
    assert isinstance(response.json()["detail"], str)


def test_malformed_json_is_422(client):
    response = client.put(
        "/account-creation",
        headers={**ADMIN, "Content-Type": "application/json"},
        content=b"{not json",
    )
    assert response.status_code == 422
