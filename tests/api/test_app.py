"""The app itself: bearer auth on every route, the client allowlist, tokens in settings."""

from __future__ import annotations

import json

import pytest
from api_support import ADMIN, ADMIN_TOKEN, MONITOR
from chatmail_api.app import create_app
from fastapi.testclient import TestClient


@pytest.mark.parametrize(
    "method,path,headers,code",
    [
        ("GET", "/status", {}, 401),
        ("GET", "/status", {"Authorization": "Bearer nope-nope-nope-nope"}, 401),
        ("GET", "/status", {"Authorization": "Basic YTpi"}, 401),
        ("GET", "/status", MONITOR, 200),
        ("GET", "/status", ADMIN, 200),
        ("GET", "/metrics", {}, 401),
        ("GET", "/dns/zone", {}, 401),
        ("GET", "/account-creation", MONITOR, 200),
        ("PUT", "/account-creation", MONITOR, 403),
        ("POST", "/probe", MONITOR, 403),
        ("POST", "/probe", {}, 401),
        ("GET", "/health", {}, 401),
        ("GET", "/health", MONITOR, 200),
    ],
    ids=lambda v: v if isinstance(v, str | int) else None,
)
def test_auth(client, method, path, headers, code):
    body = {"enabled": False, "reason": "x"} if method == "PUT" else None
    response = client.request(method, path, headers=headers, json=body)
    assert response.status_code == code, response.text
    if code in (401, 403):
        assert isinstance(response.json()["detail"], str)
    if code == 401:
        assert response.headers["www-authenticate"] == "Bearer"


def test_allowlist_refuses_other_clients(api_settings):
    settings, config = api_settings(allow=["10.0.0.0/8"])
    with TestClient(create_app(settings, config)) as client:
        response = client.get("/status", headers=ADMIN)
        assert response.status_code == 403
        assert "not allowed" in response.json()["detail"]
        assert client.get("/health", headers=MONITOR).status_code == 403


def test_short_tokens_rejected_by_settings(api_settings):
    with pytest.raises(ValueError, match="shorter than 16"):
        api_settings(tokens={"admin": {"alice": "short"}})


def test_admin_token_in_settings_is_admin(api_settings):
    settings, _ = api_settings()
    assert settings.tokens.admin["alice"] == ADMIN_TOKEN


def test_tokens_file_adds_tokens(tmp_path, api_settings):

    from chatmail_api.settings import load_settings

    settings, _ = api_settings(tokens={"monitor": {"a": "m" * 20}, "admin": {}})
    (tmp_path / "api.json").write_text(settings.model_dump_json())
    (tmp_path / "tokens.json").write_text(json.dumps({"admin": {"root": "r" * 32}}))
    settings = load_settings(tmp_path / "api.json", tmp_path / "tokens.json")
    assert settings.tokens.monitor == {"a": "m" * 20}
    assert settings.tokens.admin == {"root": "r" * 32}
    (tmp_path / "tokens.json").write_text(json.dumps({"admin": {"root": "short"}}))
    with pytest.raises(ValueError, match="16"):
        load_settings(tmp_path / "api.json", tmp_path / "tokens.json")
