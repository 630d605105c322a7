"""/new: credential proposals, refusals, the per-client rate limit, self-signed relays."""

from __future__ import annotations

import pytest
from api_support import ADMIN
from chatmail_api.app import create_app
from chatmail_api.runtime import RateLimiter
from fastapi.testclient import TestClient


def test_new_gives_credentials(client):
    response = client.post("/new")
    assert response.status_code == 200
    body = response.json()
    assert body["email"].endswith("@chat.example.org")
    assert len(body["password"]) >= 10
    assert body["dclogin_url"] is None
    assert client.post("/new").json()["email"] != body["email"]


def test_new_self_mode_get_answers(api_settings, make_config):
    settings, _ = api_settings()
    config = make_config(
        "_chat.example.org", max_load_1m=10000, min_free_disk_space="1M", min_available_memory="1M"
    )
    with TestClient(create_app(settings, config)) as client:
        body = client.get("/new").json()
        assert body["email"].endswith("@_chat.example.org")
        assert body["dclogin_url"].startswith("dclogin:") and "ic=3" in body["dclogin_url"]


def test_new_self_mode_on_an_ordinary_domain_answers(api_settings):
    """``tls: mode: self`` without a _-domain: nginx passes GET /new on, so the API answers."""
    settings, config = api_settings({"tls_mode": "self"})
    with TestClient(create_app(settings, config)) as client:
        response = client.get("/new", follow_redirects=False)
        assert response.status_code == 200
        body = response.json()
        assert body["email"].endswith("@chat.example.org")
        assert "ic=3" in body["dclogin_url"]


def test_new_refused_while_closed(api_settings):
    settings, config = api_settings()
    with TestClient(create_app(settings, config)) as client:
        client.put("/account-creation", headers=ADMIN, json={"enabled": False, "reason": "full"})
        response = client.post("/new")
        assert response.status_code == 403
        assert response.json()["detail"] == "account creation is closed: full"


def test_new_refused_by_system_limit(api_settings):
    settings, config = api_settings({"min_available_memory": "100000000G"})
    with TestClient(create_app(settings, config)) as client:
        response = client.post("/new")
        assert response.status_code == 503
        assert "short of resources" in response.json()["detail"]
        assert response.headers["retry-after"] == "300"


def test_new_rate_limited(api_settings):
    settings, config = api_settings(new_account={"rate_per_s": 0.5, "burst": 3})
    with TestClient(create_app(settings, config)) as client:
        codes = [client.post("/new").status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        assert int(client.post("/new").headers["retry-after"]) >= 1


def test_rate_limiter_refills():
    limiter = RateLimiter(rate_per_s=2, burst=2)
    assert limiter.allow("a", now=0) == 0 and limiter.allow("a", now=0) == 0
    assert limiter.allow("a", now=0) == pytest.approx(0.5)
    assert limiter.allow("b", now=0) == 0  # per client
    assert limiter.allow("a", now=0.6) == 0


def test_rate_limiter_counts_ipv6_per_64():
    """One IPv6 host owns a whole /64: new addresses from it share one bucket (as nginx)."""
    limiter = RateLimiter(rate_per_s=1, burst=1)
    assert limiter.allow("2001:db8:1:2::1", now=0) == 0
    assert limiter.allow("2001:db8:1:2:ffff::9", now=0) > 0
    assert limiter.allow("2001:db8:1:3::1", now=0) == 0  # the next /64 is someone else
    assert limiter.allow("192.0.2.1", now=0) == 0
    assert limiter.allow("192.0.2.2", now=0) == 0  # IPv4 per address
