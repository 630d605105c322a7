"""GET /metrics: the exposition, and account counts from the chatmail-accountstats file."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from api_support import MONITOR
from chatmail_api.app import create_app
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from chatmaild.accounts import hash_password
from chatmaild.accountstats import scan_mailboxes
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


def test_stats_file_written_by_the_scanner(api_settings, tmp_path):
    """On the relay a vmail timer scans; the API only reads the file it writes."""

    stats_file = tmp_path / "account-stats.json"
    settings, config = api_settings(account_stats_file=str(stats_file))
    make_accounts(config, 4)
    app = create_app(settings, config)
    with TestClient(app) as client:
        assert asyncio.run(app.state.runtime.scan_accounts()) is None  # nothing yet
        assert "chatmail_accounts{" not in client.get("/metrics", headers=MONITOR).text
        accountstats = Path(sys.executable).with_name("chatmail-accountstats")
        subprocess.run(
            [accountstats, tmp_path / "chatmail.ini", stats_file], check=True, timeout=60
        )
        # /metrics reads a new file itself, without waiting for the scheduled read
        got = samples(client.get("/metrics", headers=MONITOR).text)
        assert got[("chatmail_accounts", (("kind", "all"),))] == 4
        make_accounts(config, 1, prefix="late")
        subprocess.run(
            [accountstats, tmp_path / "chatmail.ini", stats_file], check=True, timeout=60
        )
        got = samples(client.get("/metrics", headers=MONITOR).text)
        assert got[("chatmail_accounts", (("kind", "all"),))] == 5
