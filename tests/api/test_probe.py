"""POST /probe: submission with STARTTLS and AUTH, read back and deleted over IMAPS."""

from __future__ import annotations

import json
import ssl

import pytest
from api_support import ADMIN, MONITOR, free_port, make_cert
from chatmail_api.app import create_app
from chatmail_api.probe import build_probe_message
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


def test_probe_disabled_is_409(client):
    assert client.post("/probe", headers=ADMIN).status_code == 409
