"""/metrics content and the public /new endpoint."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from api_support import ADMIN, MONITOR
from chatmail_api.accountstats import scan_mailboxes
from chatmail_api.app import create_app
from chatmail_api.runtime import RateLimiter
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from chatmaild.accounts import hash_password
from chatmaild.counters import Counters
from chatmaild.user import User


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


STORED_HASH = hash_password("password123")


def make_accounts(config, count: int, prefix: str = "user", login_age_days: float = 0):
    for i in range(count):
        user = User(config.mailboxes_path, f"{prefix}{i:05d}@{config.mail_domain}")
        user.set_password(STORED_HASH)
        (user.maildir / "cur").mkdir()
        (user.maildir / "new").mkdir()
        (user.maildir / "cur" / "1.msg").write_bytes(b"x" * 1000)
        stamp = time.time() - login_age_days * 86400
        os.utime(user.password_path, (stamp, stamp))


def test_metrics_exposition(api_settings):
    settings, config = api_settings()
    make_accounts(config, 3)
    make_accounts(config, 2, prefix="ci-", login_age_days=20)
    counters = Counters(config.counters_dir, "doveauth")
    counters.inc("accounts_created_total", amount=5)
    counters.inc("registrations_rejected_total", reason="nocreate")
    counters.inc("registrations_rejected_total", reason="someone@chat.example.org")
    counters.flush()
    filtermail = Counters(config.counters_dir, "filtermail")
    filtermail.inc("mail_filtered_total", direction="outgoing", encrypted="true", result="accepted")
    filtermail.inc("notifications_sent_total", amount=2)
    filtermail.flush()

    app = create_app(settings, config)
    with TestClient(app) as client:
        asyncio.run(app.state.runtime.scan_accounts())
        response = client.get("/metrics", headers=MONITOR)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        got = samples(response.text)

    assert got[("chatmail_accounts", (("kind", "all"),))] == 5
    assert got[("chatmail_accounts", (("kind", "ci"),))] == 2
    assert got[("chatmail_accounts", (("kind", "user"),))] == 3
    assert got[("chatmail_accounts_active", (("days", "1"),))] == 3
    assert got[("chatmail_accounts_active", (("days", "30"),))] == 5
    assert got[("chatmail_storage_bytes", (("kind", "messages"),))] == 5000
    assert got[("chatmail_storage_bytes", (("kind", "total"),))] >= 5000
    assert got[("chatmail_accounts_created_total", ())] == 5
    assert got[("chatmail_registrations_rejected_total", (("reason", "nocreate"),))] == 1
    assert (
        got[
            (
                "chatmail_mail_filtered_total",
                (("direction", "outgoing"), ("encrypted", "true"), ("result", "accepted")),
            )
        ]
        == 1
    )
    assert got[("chatmail_notifications_sent_total", ())] == 2
    assert got[("chatmail_notifications_failed_total", ())] == 0
    assert got[("chatmail_build_info", (("version", "abc1234"),))] == 1
    assert got[("chatmail_registration_open", ())] == 1
    assert got[("chatmail_check_ok", (("check", "tls.expiry"), ("severity", "critical")))] == 1
    assert got[("chatmail_check_ok", (("check", "probe.e2e"), ("severity", "info")))] == 0
    # No label value ever carries an address.
    assert "@" not in "".join(str(labels) for _, labels in got)


def test_scan_counts_activity_windows(make_config):
    config = make_config()
    make_accounts(config, 2, login_age_days=0.5)
    make_accounts(config, 1, prefix="old", login_age_days=120)
    (config.mailboxes_path / "not-an-account").mkdir()
    stats = scan_mailboxes(config.mailboxes_path)
    assert stats.accounts == {"all": 3, "ci": 0, "user": 3}
    assert stats.active[1] == 2 and stats.active[100] == 2 and stats.active[150] == 3


# -- /new ----------------------------------------------------------------------------------


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


def test_stats_file_written_by_the_scanner(api_settings, tmp_path):
    """On the relay a vmail timer scans; the API only reads the file it writes."""
    import subprocess
    import sys

    stats_file = tmp_path / "account-stats.json"
    settings, config = api_settings(account_stats_file=str(stats_file))
    make_accounts(config, 4)
    app = create_app(settings, config)
    with TestClient(app) as client:
        assert asyncio.run(app.state.runtime.scan_accounts()) is None  # nothing yet
        assert "chatmail_accounts{" not in client.get("/metrics", headers=MONITOR).text
        subprocess.run(
            [
                sys.executable,
                "-m",
                "chatmail_api.accountstats",
                str(tmp_path / "chatmail.ini"),
                str(stats_file),
            ],
            check=True,
        )
        asyncio.run(app.state.runtime.scan_accounts())
        got = samples(client.get("/metrics", headers=MONITOR).text)
        assert got[("chatmail_accounts", (("kind", "all"),))] == 4


def test_tokens_file_adds_tokens(tmp_path):
    import json

    from chatmail_api.settings import load_settings

    (tmp_path / "api.json").write_text(json.dumps({"tokens": {"monitor": {"a": "m" * 20}}}))
    (tmp_path / "tokens.json").write_text(json.dumps({"admin": {"root": "r" * 32}}))
    settings = load_settings(tmp_path / "api.json", tmp_path / "tokens.json")
    assert settings.tokens.monitor == {"a": "m" * 20}
    assert settings.tokens.admin == {"root": "r" * 32}
    (tmp_path / "tokens.json").write_text(json.dumps({"admin": {"root": "short"}}))
    with pytest.raises(ValueError, match="16"):
        load_settings(tmp_path / "api.json", tmp_path / "tokens.json")
