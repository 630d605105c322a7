"""POST /probe: submission with STARTTLS and AUTH, read back and deleted over IMAPS."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from datetime import UTC, datetime

import pytest
from api_support import ADMIN, MONITOR, free_port, make_cert
from chatmail_api.app import create_app
from chatmail_api.models import ProbeResult
from chatmail_api.probe import build_probe_message
from chatmail_api.runtime import Runtime
from fastapi.testclient import TestClient
from mail_servers import Mailboxes, start_imaps, start_submission

from chatmaild.mailcheck import is_encrypted, parse_mail


@pytest.fixture
def mail_servers(tmp_path):
    cert = make_cert(tmp_path / "mail.pem", 30, ["chat.example.org"], tmp_path / "mail.key")
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, tmp_path / "mail.key")
    boxes = Mailboxes()
    submission = start_submission(boxes, tls, free_port())
    imaps = start_imaps(boxes, tls)
    yield boxes, submission.port, imaps.server_address[1]
    submission.stop()
    imaps.shutdown()
    imaps.server_close()


def test_probe_message_passes_the_outgoing_encryption_rule():
    message = build_probe_message("ci-abc@chat.example.org", "probe-1@chat.example.org")
    assert is_encrypted(parse_mail(message), outgoing=True)


def test_probe_round_trip(api_settings, mail_servers):
    boxes, smtp_port, imap_port = mail_servers
    settings, config = api_settings(
        probe={
            "enabled": True,
            "interval_s": 0,
            "submission_port": smtp_port,
            "imap_port": imap_port,
            "timeout_s": 10,
        },
    )
    with TestClient(create_app(settings, config)) as client:
        response = client.post("/probe", headers=ADMIN)
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["ok"] is True, result
        creds = json.loads(settings.probe_credentials_path.read_text())
        assert creds["email"].startswith("ci-") and creds["email"] in boxes.passwords
        assert settings.probe_credentials_path.stat().st_mode & 0o077 == 0
        assert boxes.messages[creds["email"]] == []  # read back and deleted

        check = {c["id"]: c for c in client.get("/status", headers=MONITOR).json()["checks"]}
        assert check["probe.e2e"]["state"] == "ok"
        metrics = client.get("/metrics", headers=MONITOR).text
        assert "chatmail_probe_success 1.0" in metrics
        assert "chatmail_probe_duration_seconds" in metrics

        # the same account is reused
        assert client.post("/probe", headers=ADMIN).json()["ok"] is True
        assert len(boxes.passwords) == 1


def test_probe_failure_reported(api_settings):
    settings, config = api_settings(
        probe={"enabled": True, "interval_s": 0, "submission_port": free_port(), "timeout_s": 2},
    )
    with TestClient(create_app(settings, config)) as client:
        result = client.post("/probe", headers=ADMIN).json()
        assert result["ok"] is False and result["detail"].startswith("submission")
        data = client.get("/status", headers=MONITOR).json()
        check = {c["id"]: c for c in data["checks"]}["probe.e2e"]
        assert check["state"] == "fail" and check["severity"] == "critical"
        assert data["status"] == "down"
        assert "chatmail_probe_success 0.0" in client.get("/metrics", headers=MONITOR).text


def test_probe_refused_while_creation_is_closed_is_not_down(api_settings, mail_servers):
    """The probe account is made by its first login: with creation closed before it
    existed, the refusal is the operator's choice, shown as unproven, not as mail down."""
    boxes, submission_port, imap_port = mail_servers
    boxes.creation_closed = True
    settings, config = api_settings(
        probe={
            "enabled": True,
            "interval_s": 0,
            "submission_port": submission_port,
            "imap_port": imap_port,
            "timeout_s": 5,
        },
    )
    with TestClient(create_app(settings, config)) as client:
        result = client.post("/probe", headers=ADMIN).json()
        assert result["ok"] is False and "SMTPAuthenticationError" in result["detail"]
        check = {c["id"]: c for c in client.get("/status", headers=MONITOR).json()["checks"]}
        assert check["probe.e2e"]["state"] == "fail", "creation is open: a real failure"
        config.nocreate_file.write_text("closed\n")
        client.post("/probe", headers=ADMIN)
        data = client.get("/status", headers=MONITOR).json()
        check = {c["id"]: c for c in data["checks"]}["probe.e2e"]
        assert (check["state"], check["severity"]) == ("unknown", "warning"), check
        assert "not proven" in check["summary"] and data["status"] != "down"


def test_probe_disabled_is_409(client):
    assert client.post("/probe", headers=ADMIN).status_code == 409


class ScriptedRuntime(Runtime):
    """The scheduled probe's policy over a scripted probe and scripted service states."""

    def __init__(self, settings, config, outcomes: list[bool], services_up_after: int = 0):
        super().__init__(settings, config)
        self.outcomes = list(outcomes)
        self.service_polls = 0
        self.services_up_after = services_up_after
        self.probed_at: list[float] = []
        self.published: list[bool] = []

    async def services_active(self) -> bool:
        self.service_polls += 1
        return self.service_polls > self.services_up_after

    async def run_probe(self, publish: bool = True) -> ProbeResult:
        assert publish is False
        self.probed_at.append(time.monotonic())
        ok = self.outcomes.pop(0) if self.outcomes else True
        return ProbeResult(ok=ok, started_at=datetime.now(UTC), duration_s=0.01, detail="x")

    def invalidate_status(self) -> None:
        self.published.append(self.checker.probe_result.ok)
        super().invalidate_status()


async def _run_schedule(runtime: ScriptedRuntime, until_probes: int, timeout: float = 10) -> None:
    task = asyncio.create_task(runtime._probe_schedule())
    deadline = time.monotonic() + timeout
    while len(runtime.probed_at) < until_probes and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_scheduled_probe_waits_for_services(api_settings, monkeypatch):
    monkeypatch.setattr("chatmail_api.runtime.SERVICES_POLL_S", 0.01)
    settings, config = api_settings(probe={"enabled": True, "interval_s": 60, "retry_s": 0.05})
    runtime = ScriptedRuntime(settings, config, [True], services_up_after=3)
    asyncio.run(_run_schedule(runtime, 1))
    assert runtime.service_polls == 4 and len(runtime.probed_at) == 1
    assert runtime.published == [True]


def test_one_failed_probe_is_retried_soon_and_not_published(api_settings):
    settings, config = api_settings(probe={"enabled": True, "interval_s": 60, "retry_s": 0.05})
    runtime = ScriptedRuntime(settings, config, [False, True])
    asyncio.run(_run_schedule(runtime, 2))
    assert len(runtime.probed_at) == 2, "the retry must come long before the 60 s interval"
    assert runtime.published == [True], "a failure the retry did not confirm is not shown"


def test_failures_back_off_up_to_the_interval_and_are_published(api_settings):
    settings, config = api_settings(probe={"enabled": True, "interval_s": 0.4, "retry_s": 0.05})
    runtime = ScriptedRuntime(settings, config, [False] * 6)
    asyncio.run(_run_schedule(runtime, 6))
    gaps = [b - a for a, b in zip(runtime.probed_at, runtime.probed_at[1:], strict=False)]
    expected = [0.05, 0.1, 0.2, 0.4, 0.4]
    for gap, want in zip(gaps, expected, strict=True):
        assert want * 0.9 <= gap < want + 0.15, (gaps, expected)
    assert runtime.published == [False] * 5, "every confirmed failure reaches /status"
