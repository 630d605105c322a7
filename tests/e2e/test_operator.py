"""The operator's daily tools on the applied container relay: accounts and queue through
the control API and through ``salt-call chatmail.*`` inside the relay, the highstate's
own probe, and /health that does not cry wolf after an apply."""

from __future__ import annotations

import json
import smtplib
import time
import uuid
from imaplib import IMAP4

import httpx
import pytest
from relayclient import encrypted_mail, message_id

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

API_PORT = 8077
TOKENS_FILE = "/etc/chatmail/api-tokens.json"
STATS_UNIT = "chatmail-account-stats.service"
AUDIT_LOG = "/var/lib/chatmail-api/audit.log"


@pytest.fixture(scope="module")
def api(relay):
    relay.container.wait_for_port(API_PORT, timeout=60)
    # a master's operator runs `salt '*' saltutil.sync_modules` once after an update
    synced = relay.container.salt_call("saltutil.sync_modules")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    tokens = json.loads(relay.container.read_file(TOKENS_FILE))
    ((_, monitor),) = tokens["monitor"].items()
    ((admin_name, admin),) = tokens["admin"].items()
    with httpx.Client(base_url=f"http://127.0.0.1:{API_PORT}", timeout=60) as client:
        client.monitor = {"Authorization": f"Bearer {monitor}"}
        client.admin = {"Authorization": f"Bearer {admin}"}
        client.admin_name = admin_name
        yield client


def salt(relay, function: str, *args: str):
    """``salt-call chatmail.<function>`` inside the relay; its return value."""
    res = relay.container.salt_call("--out=json", f"chatmail.{function}", *args, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)["local"]


def poll_health(seconds: float) -> list[str]:
    """/health every second; the states it answered (a refused connection is skipped)."""
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            seen.append(
                httpx.get(f"http://127.0.0.1:{API_PORT}/health", timeout=5).json()["status"]
            )
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(1)
    return seen


def test_health_never_down_after_first_apply(relay, applied):
    """From the end of the first apply (the fixture), and again after the API and the DKIM
    signer restart together (the race of a first apply), /health never says down."""
    seen = poll_health(45)
    signer = "opendkim" if relay.platform.mta == "postfix" else relay.platform.mta_unit
    relay.container.run(["systemctl", "restart", "chatmail-api", signer])
    seen += poll_health(60)
    assert seen and "down" not in seen, seen
    assert applied.first_apply.ok
    assert "chatmail probe: mail flows" in applied.first_apply.raw


def login_refused(relay, addr: str, password: str) -> dict:
    refused = {}
    try:
        with relay.imap(addr, password):
            refused["imap"] = False
    except IMAP4.error:
        refused["imap"] = True
    try:
        with relay.smtp(587, addr, password):
            refused["smtp"] = False
    except smtplib.SMTPAuthenticationError:
        refused["smtp"] = True
    return refused


def send_to(relay, sender, sender_pw, rcpt) -> str:
    msgid = message_id(relay.domain)
    relay.send(587, sender, sender_pw, [rcpt], encrypted_mail(sender, [rcpt], msgid))
    return msgid


def test_accounts_list_inspect_block_unblock_delete(relay, api):
    (addr, pw), (other, other_pw) = relay.new_account(), relay.new_account()
    send_to(relay, other, other_pw, addr)
    relay.container.run(["systemctl", "start", STATS_UNIT])

    page = api.get("/accounts", params={"prefix": addr[:6]}, headers=api.monitor).json()
    assert addr in [a["address"] for a in page["accounts"]], page
    assert "password" not in json.dumps(page)
    by_login = api.get("/accounts?sort=last_login&limit=1000", headers=api.monitor)
    assert by_login.status_code == 200
    info = api.get(f"/accounts/{addr}", headers=api.monitor).json()
    assert info["exists"] and info["enforce_e2ee"] and info["blocked"] is None
    assert info["quota_bytes"] == 500 * 1024 * 1024 and info["last_login"]
    assert salt(relay, "account_info", addr)["address"] == addr

    # block: logins refused, mail to it refused with a clear reply, data kept
    resp = api.post(f"/accounts/{addr}/block", headers=api.admin, json={"reason": "e2e"})
    assert resp.json() == {"changed": True}, resp.text
    assert login_refused(relay, addr, pw) == {"imap": True, "smtp": True}
    with pytest.raises((smtplib.SMTPRecipientsRefused, smtplib.SMTPDataError)) as refused:
        send_to(relay, other, other_pw, addr)
    assert "5.2.1" in str(refused.value) and "disabled" in str(refused.value)
    kept = salt(relay, "account_info", addr)
    assert kept["exists"] and kept["messages"] >= 1 and kept["blocked"]["reason"] == "e2e"

    # unblock: everything works again
    assert api.post(f"/accounts/{addr}/unblock", headers=api.admin).json() == {"changed": True}
    assert login_refused(relay, addr, pw) == {"imap": False, "smtp": False}
    msgid = send_to(relay, other, other_pw, addr)
    relay.fetch_inbox_message(addr, pw, msgid)

    # delete from the salt module: mailbox gone, re-creation by login refused
    assert salt(relay, "delete_account", addr, "reason=e2e")["mailbox_removed"] is True
    assert not relay.account_exists(addr)
    assert login_refused(relay, addr, pw)["imap"] is True
    assert not relay.account_exists(addr)
    gone = api.get(f"/accounts/{addr}", headers=api.monitor).json()
    assert gone["exists"] is False and gone["blocked"]["deleted"] is True

    salt(relay, "block", other, "reason=salt")
    assert login_refused(relay, other, other_pw)["imap"] is True
    salt(relay, "unblock", other)
    assert login_refused(relay, other, other_pw)["imap"] is False

    audit = [json.loads(line) for line in relay.container.read_file(AUDIT_LOG).splitlines()]
    actions = [(e["action"], e["by"]) for e in audit if e.get("address") in (addr, other)]
    assert actions == [
        ("block", api.admin_name),
        ("unblock", api.admin_name),
        ("delete", "salt"),
        ("block", "salt"),
        ("unblock", "salt"),
    ], actions


@pytest.mark.parametrize("address", ["../x", "a%00b", "%C3%BC@x", "x" * 10_000, "..%2F..%2Fetc"])
def test_hostile_addresses(relay, api, address):
    for method, path in [("GET", ""), ("DELETE", ""), ("POST", "/block"), ("POST", "/unblock")]:
        resp = api.request(method, f"/accounts/{address}{path}", headers=api.admin)
        assert resp.status_code in (404, 422), (method, address[:40], resp.status_code)


def test_queue_list_and_delete(relay, api, unreachable_mx):
    sender, sender_pw = relay.new_account()
    remote = f"someone-{uuid.uuid4().hex[:6]}@_unreachable.test"
    relay.local_data("_unreachable.test. 300 IN MX 10 mx._unreachable.test.")
    relay.local_data(f"mx._unreachable.test. 300 IN A {unreachable_mx}")
    send_to(relay, sender, sender_pw, remote)
    queue_id, _ = relay.queued_message(remote)

    deadline = time.monotonic() + 60
    while True:
        messages = api.get("/queue", headers=api.monitor).json()["messages"]
        mine = [m for m in messages if m["id"] == queue_id]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert mine, messages
    assert mine[0]["recipient_domains"] == ["_unreachable.test"] and mine[0]["age_s"] >= 0
    assert any(m["id"] == queue_id for m in salt(relay, "queue"))
    assert api.post("/queue/flush", headers=api.admin).json() == {"changed": True}
    assert api.delete(f"/queue/{queue_id}", headers=api.monitor).status_code == 403
    assert api.delete(f"/queue/{queue_id}", headers=api.admin).json() == {"changed": True}
    left = api.get("/queue", headers=api.monitor).json()["messages"]
    assert queue_id not in [m["id"] for m in left]
    assert api.delete(f"/queue/{queue_id}", headers=api.admin).status_code == 404


def test_highstate_probe_fails_with_dovecot_stopped(relay):
    """The self-check state names the step; Salt's own apply would start Dovecot again,
    so only the self-check (and what it includes, not Dovecot) is applied here."""
    relay.container.run(["systemctl", "stop", "dovecot"])
    try:
        res = relay.container.salt_call(
            "--out=json", "--retcode-passthrough", "state.apply", "chatmail.selfcheck",
            'pillar={"chatmail": {"api": {"selfcheck_within": 10}}}',
        )  # fmt: skip
        assert res.returncode != 0, res.stdout[-2000:]
        assert "dovecot" in res.stdout and "step services" in res.stdout, res.stdout[-2000:]
    finally:
        relay.container.run(["systemctl", "start", "dovecot"])
    relay.container.wait_for_services()
    ok = relay.container.salt_call(
        "--out=json", "--retcode-passthrough", "state.apply", "chatmail.selfcheck"
    )
    assert ok.returncode == 0, ok.stdout[-2000:]
    assert "chatmail probe: mail flows" in ok.stdout


def _metric(api, name: str) -> float:
    text = api.get("/metrics", headers=api.monitor).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return values[0] if values else 0.0


def test_logins_are_counted(relay, api):
    before = _metric(api, "chatmail_logins_total")
    addr, password = relay.new_account()
    with relay.imap(addr, password):
        pass
    deadline = time.monotonic() + 20
    while _metric(api, "chatmail_logins_total") <= before and time.monotonic() < deadline:
        time.sleep(1)
    assert _metric(api, "chatmail_logins_total") > before


def test_journal_counters_count_deliveries_dkim_noqueue(relay, api):
    """Upstream's mtail counters, counted from the journal by chatmail-logcounter."""
    sender, sender_pw = relay.new_account()
    rcpt, rcpt_pw = relay.new_account()
    relay.fetch_inbox_message(rcpt, rcpt_pw, send_to(relay, sender, sender_pw, rcpt))
    postfix = relay.platform.mta == "postfix"
    if postfix:  # an open-relay attempt: refused before queueing
        with relay.smtp(25) as conn, pytest.raises(smtplib.SMTPRecipientsRefused):
            conn.sendmail("someone@example.org", ["victim@example.org"], b"Subject: x\r\n\r\nx")
    expected = ["chatmail_delivered_mail_total"]
    if postfix:
        expected += ["chatmail_postfix_noqueue_total", "chatmail_dkim_signed_total"]
    deadline = time.monotonic() + 20
    while True:
        counts = {name: _metric(api, name) for name in expected}
        if all(counts.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    for name in ("chatmail_quota_exceeded_total", "chatmail_mailer_daemon_mail_total"):
        assert f"\n{name} " in api.get("/metrics", headers=api.monitor).text
    assert all(counts.values()), counts
