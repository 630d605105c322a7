"""GET /status: every check, caching, and the pure parsers behind the checks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from api_support import MONITOR, checks_by_id, make_cert
from chatmail_api.app import create_app
from chatmail_api.checks import (
    CheckResult,
    default_ports,
    overall,
    parse_postqueue_json,
    parse_systemctl_is_active,
)
from fastapi.testclient import TestClient

from chatmaild.accounts import hash_password


def test_status_reports_every_check(client, listening_port):
    response = client.get("/status", headers=MONITOR)
    assert response.status_code == 200
    data = response.json()
    checks = checks_by_id(response.json())
    assert set(checks) == {
        f"port.{listening_port}",
        "tls.expiry",
        "queue.depth",
        "disk.mailboxes",
        "registration.open",
        "version",
        "probe.e2e",
        "accounts.password_files",
    }
    assert checks["version"]["summary"] == "abc1234"
    assert checks["tls.expiry"]["state"] == "ok"
    assert checks["queue.depth"]["summary"].startswith("0 queued")
    assert data["status"] == "ok"
    assert all(c["since"] for c in checks.values())


@pytest.mark.parametrize(
    "days,severity,state",
    [
        (60, "critical", "ok"),
        (10, "warning", "fail"),
        (2, "critical", "fail"),
        (-1, "critical", "fail"),
    ],
    ids=["valid", "renewal-overdue", "about-to-expire", "expired"],
)
def test_tls_expiry(api_settings, tmp_path, days, severity, state):
    cert = make_cert(tmp_path / f"cert-{days}.pem", days, ["chat.example.org"])
    settings, config = api_settings(tls_cert=str(cert))
    with TestClient(create_app(settings, config)) as client:
        check = checks_by_id(client.get("/status", headers=MONITOR).json())["tls.expiry"]
        assert (check["severity"], check["state"]) == (severity, state)
        metrics = client.get("/metrics", headers=MONITOR).text
        assert "chatmail_tls_cert_not_after_timestamp_seconds" in metrics


def test_missing_cert_fails(api_settings, tmp_path):
    settings, config = api_settings(tls_cert=str(tmp_path / "nope.pem"))
    with TestClient(create_app(settings, config)) as client:
        check = checks_by_id(client.get("/status", headers=MONITOR).json())["tls.expiry"]
        assert check["state"] == "fail" and "nope.pem" in check["summary"]


def test_queue_depth(api_settings, fake_postqueue):
    messages = [{"queue_name": "deferred", "queue_id": str(i)} for i in range(3)]
    messages.append({"queue_name": "active", "queue_id": "x"})
    settings, config = api_settings(queue_command=fake_postqueue(messages), queue_warn=3)
    with TestClient(create_app(settings, config)) as client:
        check = checks_by_id(client.get("/status", headers=MONITOR).json())["queue.depth"]
        assert check["state"] == "fail" and check["severity"] == "warning"
        assert check["summary"].startswith("4 queued")
        metrics = client.get("/metrics", headers=MONITOR).text
        assert 'postfix_showq_queue_depth{queue="deferred"} 3.0' in metrics


def test_queue_snapshot_of_opensmtpd(api_settings, tmp_path):
    """OpenSMTPD: the queue listing comes from a file a root timer writes; a stale or
    missing file is ``unknown``, never a count."""
    snapshot = tmp_path / "smtpd-queue.txt"
    envelope = (
        "{:016x}|inet4|mta|auth|a@x.test|b@y.test|b@y.test|1795771209|1795771209|0|2|pending|3|"
    )
    snapshot.write_text("".join(envelope.format(i) + "\n" for i in range(5)))
    settings, config = api_settings(queue_snapshot=str(snapshot), queue_warn=5)
    with TestClient(create_app(settings, config)) as client:
        check = checks_by_id(client.get("/status", headers=MONITOR).json())["queue.depth"]
        assert check["state"] == "fail" and check["summary"].startswith("5 queued"), check
        metrics = client.get("/metrics", headers=MONITOR).text
        assert 'postfix_showq_queue_depth{queue="queue"} 5.0' in metrics

    stale = time.time() - 3600
    os.utime(snapshot, (stale, stale))
    settings, config = api_settings(queue_snapshot=str(snapshot))
    with TestClient(create_app(settings, config)) as client:
        check = checks_by_id(client.get("/status", headers=MONITOR).json())["queue.depth"]
        assert check["state"] == "unknown" and "s old" in check["summary"], check

    snapshot.unlink()
    settings, config = api_settings(queue_snapshot=str(snapshot))
    with TestClient(create_app(settings, config)) as client:
        check = checks_by_id(client.get("/status", headers=MONITOR).json())["queue.depth"]
        assert check["state"] == "unknown" and "No such file" in check["summary"], check


@pytest.mark.parametrize("mta", ["postfix", "opensmtpd"])
def test_default_ports_follow_the_mta(make_config, mta):
    config = make_config("chat.example.org")
    ports = {p.port: p.what for p in default_ports(config, mta)}
    assert {25, 465, 587, 993, 143, 443} <= set(ports)
    filtermail = {config.filtermail_smtp_port, config.filtermail_smtp_port_incoming}
    # OpenSMTPD runs filtermail's rules inside smtpd: nothing listens on those ports there
    assert (filtermail <= set(ports)) == (mta == "postfix"), ports
    assert ports[25] == ("SMTP (Postfix)" if mta == "postfix" else "SMTP (OpenSMTPD)")


def test_real_postqueue_without_postfix_is_unknown(api_settings):
    # The host has Postfix installed but not running: the check must not claim "ok".
    settings, config = api_settings(queue_command=["postqueue", "-j"])
    with TestClient(create_app(settings, config)) as client:
        check = checks_by_id(client.get("/status", headers=MONITOR).json())["queue.depth"]
        assert check["state"] == "unknown"


def test_services_without_systemd_are_unknown(api_settings):
    settings, config = api_settings(services=[{"name": "dovecot"}, {"name": "postfix"}])
    with TestClient(create_app(settings, config)) as client:
        data = client.get("/status", headers=MONITOR).json()
        checks = checks_by_id(data)
        assert checks["service.dovecot"]["state"] == "unknown"
        assert checks["service.postfix"]["state"] == "unknown"
        assert data["status"] == "degraded"


def test_services_from_systemctl(api_settings, tmp_path, monkeypatch):
    # systemd does not run on the test host; a systemctl printing real is-active output.
    bindir = tmp_path / "sysbin"
    bindir.mkdir()
    (bindir / "systemctl").write_text("#!/bin/sh\nprintf 'active\\nfailed\\n'\nexit 3\n")
    (bindir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    settings, config = api_settings(
        services=[{"name": "dovecot"}, {"name": "unbound", "severity": "warning"}]
    )
    with TestClient(create_app(settings, config)) as client:
        data = client.get("/status", headers=MONITOR).json()
        checks = checks_by_id(data)
        assert checks["service.dovecot"]["state"] == "ok"
        assert checks["service.unbound"]["state"] == "fail"
        assert "journalctl -u unbound" in checks["service.unbound"]["hint"]
        assert data["status"] == "degraded"


def test_disk_and_system_limit(api_settings):
    settings, config = api_settings({"min_free_disk_space": "1000000G"})
    with TestClient(create_app(settings, config)) as client:
        checks = checks_by_id(client.get("/status", headers=MONITOR).json())
        assert checks["disk.mailboxes"]["state"] == "fail"
        registration = checks["registration.open"]
        assert registration["state"] == "fail" and "min_free_disk_space" in registration["summary"]
        state = client.get("/account-creation", headers=MONITOR).json()
        assert state["enabled"] is False and state["closed_by_file"] is False
        assert "free disk space" in state["system_limit"]


def write_account(config, addr: str, password_file: bytes | None) -> None:
    maildir = config.mailboxes_path / addr
    maildir.mkdir(parents=True)
    if password_file is not None:
        (maildir / "password").write_bytes(password_file)


@pytest.mark.parametrize("via_stats_file", [False, True], ids=["in-process", "timer-file"])
def test_unusable_password_files_are_reported(api_settings, tmp_path, via_stats_file):
    """Accounts whose password file exists but is unusable fail their logins temporarily;
    /status names them with a hint, /status stays 200 and the relay "degraded"."""
    stats_file = tmp_path / "account-stats.json"
    overrides = {"account_stats_file": str(stats_file)} if via_stats_file else {}
    settings, config = api_settings(**overrides)
    domain = config.mail_domain
    write_account(config, f"fine00000@{domain}", hash_password("password123").encode())
    write_account(config, f"creating0@{domain}", None)  # mid-creation: no file yet, fine
    for i, content in enumerate([b"", b"garbage", b"{PLAIN}secret99", "ü".encode()]):
        write_account(config, f"broken{i:03d}@{domain}", content)
    if via_stats_file:
        accountstats = Path(sys.executable).with_name("chatmail-accountstats")
        subprocess.run([accountstats, tmp_path / "chatmail.ini", stats_file], check=True)
    app = create_app(settings, config)
    with TestClient(app) as client:
        before = checks_by_id(client.get("/status", headers=MONITOR).json())
        assert before["accounts.password_files"]["state"] == "unknown"  # no scan yet, no 500
        asyncio.run(app.state.runtime.scan_accounts())
        app.state.runtime.invalidate_status()
        response = client.get("/status", headers=MONITOR)
        assert response.status_code == 200
        check = checks_by_id(response.json())["accounts.password_files"]
        assert check["state"] == "fail" and check["severity"] == "warning"
        assert check["summary"].startswith("4 unusable password files: broken000@")
        assert "fine00000" not in check["summary"] and "creating0" not in check["summary"]
        assert "password from a backup" in check["hint"]
        assert response.json()["status"] == "degraded"


def test_garbage_stats_file_leaves_the_check_unknown(api_settings, tmp_path):
    stats_file = tmp_path / "account-stats.json"
    stats_file.write_text('{"accounts": 3, "unusable_password_files": "x"}')
    settings, config = api_settings(account_stats_file=str(stats_file))
    app = create_app(settings, config)
    with TestClient(app) as client:
        asyncio.run(app.state.runtime.scan_accounts())
        app.state.runtime.invalidate_status()
        response = client.get("/status", headers=MONITOR)
        assert response.status_code == 200
        assert checks_by_id(response.json())["accounts.password_files"]["state"] == "unknown"


def test_status_is_cached_and_since_persists(api_settings):
    settings, config = api_settings()
    with TestClient(create_app(settings, config)) as client:
        first = client.get("/status", headers=MONITOR).json()
        second = client.get("/status", headers=MONITOR).json()
        assert first["checked_at"] == second["checked_at"]
    with TestClient(create_app(settings, config)) as client:
        third = client.get("/status", headers=MONITOR).json()
        assert third["checked_at"] != first["checked_at"]
        assert checks_by_id(third)["version"]["since"] == (checks_by_id(first)["version"]["since"])


def test_version_missing_is_unknown_info(api_settings, tmp_path):
    settings, config = api_settings(version_file=str(tmp_path / "none"))
    with TestClient(create_app(settings, config)) as client:
        data = client.get("/status", headers=MONITOR).json()
        version = checks_by_id(data)["version"]
        assert (version["state"], version["severity"]) == ("unknown", "info")
        assert data["status"] == "ok"


def test_stale_status_is_served_while_refreshing(api_settings):
    settings, config = api_settings(status_cache_s=0.2)
    with TestClient(create_app(settings, config)) as client:
        first = client.get("/status", headers=MONITOR).json()["checked_at"]
        time.sleep(0.3)
        # stale: answered at once from the old run, a refresh starts in the background
        assert client.get("/status", headers=MONITOR).json()["checked_at"] == first
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if client.get("/status", headers=MONITOR).json()["checked_at"] != first:
                break
            time.sleep(0.05)
        else:
            pytest.fail("status was never refreshed")


def test_parse_systemctl():
    assert parse_systemctl_is_active(["a", "b"], "active\ninactive\n") == {
        "a": "active",
        "b": "inactive",
    }
    with pytest.raises(ValueError):
        parse_systemctl_is_active(["a", "b"], "active\n")


def test_parse_postqueue():
    out = '{"queue_name": "deferred"}\n{"queue_name": "hold"}\n\n'
    depth = parse_postqueue_json(out)
    assert depth["deferred"] == 1 and depth["hold"] == 1 and depth["active"] == 0


@pytest.mark.parametrize(
    "states,expected",
    [
        ([("critical", "ok"), ("warning", "ok")], "ok"),
        ([("critical", "ok"), ("info", "fail")], "ok"),
        ([("critical", "unknown")], "degraded"),
        ([("warning", "fail")], "degraded"),
        ([("warning", "fail"), ("critical", "fail")], "down"),
    ],
    ids=["all-ok", "info-fail", "critical-unknown", "warning-fail", "critical-fail"],
)
def test_overall(states, expected):
    results = [CheckResult(f"c{i}", sev, st, "") for i, (sev, st) in enumerate(states)]
    assert overall(results) == expected


STOCK = "1:2.3.19.1+dfsg1-2.1+deb12u6"
UPSTREAM = "1:2.3.21+dfsg1-3"


@pytest.mark.parametrize(
    ("packages", "installed", "state", "says"),
    [
        ("debian", STOCK, "ok", "500 ms IDLE notification delay"),
        ("patched", STOCK + "+chatmail1", "ok", "our build, no IDLE notification delay"),
        ("upstream", UPSTREAM, "ok", "upstream's build"),
        ("patched", STOCK, "fail", "chatmail:dovecot:packages is patched"),
        ("debian", STOCK + "+chatmail1", "fail", "chatmail:dovecot:packages is debian"),
    ],
    ids=[
        "stock",
        "patched",
        "upstream",
        "patched-chosen-stock-installed",
        "stock-chosen-patched-installed",
    ],
)
def test_dovecot_build(api_settings, packages, installed, state, says):
    dovecot = {
        "packages": packages,
        "version_command": ["echo", installed],
        "upstream_version": UPSTREAM,
    }
    settings, config = api_settings(dovecot=dovecot)
    with TestClient(create_app(settings, config)) as client:
        check = checks_by_id(client.get("/status", headers=MONITOR).json())["dovecot.build"]
    assert (check["state"], check["severity"]) == (state, "warning")
    assert installed in check["summary"] and says in check["summary"]
    assert bool(check["hint"]) == (state == "fail")


def test_dovecot_build_without_dovecot_is_unknown(api_settings):
    dovecot = {"packages": "debian", "version_command": ["dpkg-query", "-W", "no-such-package"]}
    settings, config = api_settings(dovecot=dovecot)
    with TestClient(create_app(settings, config)) as client:
        check = checks_by_id(client.get("/status", headers=MONITOR).json())["dovecot.build"]
    assert check["state"] == "unknown"
