"""GET /health: the one-word verdict of the checks, for load balancers and monitors."""

from __future__ import annotations

from api_support import MONITOR, checks_by_id, free_port
from chatmail_api.app import create_app
from fastapi.testclient import TestClient


def test_closed_port_makes_health_503(api_settings, listening_port):
    closed = free_port()
    settings, config = api_settings(ports=[{"port": closed, "what": "imaps"}], public_health=True)
    with TestClient(create_app(settings, config)) as client:
        response = client.get("/health")
        assert response.status_code == 503
        assert response.json()["reason"].startswith(f"port.{closed}: imaps")
        status = client.get("/status", headers=MONITOR).json()
        assert status["status"] == "down"
        port = checks_by_id(status)[f"port.{closed}"]
        assert port["state"] == "fail" and port["hint"]


def test_public_health_needs_no_token(api_settings):
    settings, config = api_settings(public_health=True)
    with TestClient(create_app(settings, config)) as client:
        assert client.get("/health").json() == {"status": "ok"}
