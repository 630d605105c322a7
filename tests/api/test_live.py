"""The API as a real ``chatmail-api --settings`` process behind uvicorn, over TCP."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from urllib.parse import urlsplit

import httpx
import pytest
from api_support import ADMIN, MONITOR


def raw_get(url: str, path: str, headers: dict | None = None) -> http.client.HTTPResponse:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    return conn.getresponse()


def test_live_endpoints(live_api):
    url = live_api()
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}  # loopback: no token
    # forwarded by nginx from elsewhere: a token is needed (public_health is false)
    forwarded = {"X-Forwarded-For": "198.51.100.7"}
    assert httpx.get(f"{url}/health", headers=forwarded).status_code == 401
    assert httpx.get(f"{url}/health", headers={**forwarded, **MONITOR}).status_code == 200
    status = httpx.get(f"{url}/status", headers=MONITOR)
    assert status.status_code == 200 and status.json()["status"] == "ok"
    metrics = httpx.get(f"{url}/metrics", headers=MONITOR)
    assert "chatmail_check_ok" in metrics.text
    assert httpx.get(f"{url}/metrics").status_code == 401
    schema = httpx.get(f"{url}/openapi.json").json()
    assert {
        "/health",
        "/status",
        "/dns",
        "/dns/zone",
        "/account-creation",
        "/metrics",
        "/probe",
        "/new",
    } <= set(schema["paths"])
    assert httpx.get(f"{url}/docs").status_code == 200
    response = raw_get(url, "/status")
    assert response.status == 401 and "server" not in {k.lower() for k in response.headers}


def test_live_new_redirect_and_forwarded_rate_limit(live_api):
    url = live_api(new_account={"rate_per_s": 0.1, "burst": 2})
    response = raw_get(url, "/new")
    assert response.status == 301
    assert response.headers["location"] == "dcaccount:https://chat.example.org/new"

    # nginx on 127.0.0.1 appends the real client: limits apply per forwarded address.
    def post(client_ip: str) -> int:
        headers = {"X-Forwarded-For": f"203.0.113.99, {client_ip}"}
        return httpx.post(f"{url}/new", headers=headers).status_code

    assert [post("198.51.100.1") for _ in range(3)] == [200, 200, 429]
    assert post("198.51.100.2") == 200


def test_live_allowlist_admits_loopback_and_listed(live_api):
    url = live_api(allow=["198.51.100.0/24"])
    assert httpx.get(f"{url}/status", headers=MONITOR).status_code == 200  # loopback
    listed = {"X-Forwarded-For": "198.51.100.9", **MONITOR}
    assert httpx.get(f"{url}/status", headers=listed).status_code == 200
    other = {"X-Forwarded-For": "203.0.113.9", **MONITOR}
    response = httpx.get(f"{url}/status", headers=other)
    assert response.status_code == 403 and "203.0.113.9" in response.json()["detail"]


def test_live_toggle(live_api, tmp_path):
    url = live_api()
    closed = httpx.put(
        f"{url}/account-creation", headers=ADMIN, json={"enabled": False, "reason": "r"}
    )
    assert closed.status_code == 200 and closed.json()["enabled"] is False
    assert httpx.post(f"{url}/new").status_code == 403
    audit = (tmp_path / "api-state" / "audit.log").read_text().splitlines()
    assert json.loads(audit[-1])["client"] == "127.0.0.1"


@pytest.mark.parametrize(
    "settings_text,message",
    [
        ("{not json", "cannot read"),
        ('{"port": 0}', "port: Input should be greater than 0"),
        ('{"unknown_key": 1}', "unknown_key: Extra inputs are not permitted"),
        ("{}", "chatmail_ini: Field required"),
        (None, "cannot read /nonexistent"),
    ],
    ids=["not-json", "bad-port", "unknown-key", "no-defaults", "missing-ini"],
)
def test_cli_refuses_bad_settings(tmp_path, api_settings, settings_text, message):
    path = tmp_path / "api.json"
    if settings_text is None:  # complete settings, but their chatmail.ini is missing
        settings, _ = api_settings(chatmail_ini="/nonexistent/chatmail.ini")
        settings_text = settings.model_dump_json()
    path.write_text(settings_text)
    result = subprocess.run(
        [sys.executable, "-m", "chatmail_api.main", "--settings", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr
