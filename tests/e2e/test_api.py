"""The control API (chatmail_api) on the relay applied in a container, called from outside.

The container shares the host's network, so the API's loopback listener (127.0.0.1:8077)
is reached as curl on the relay would reach it. Tokens are the ones the formula generated
into the container's tokens file. Every test shares the session's relay with test_relay.py
(the ``relay`` fixture is session-scoped) and leaves account creation open.
"""

from __future__ import annotations

import imaplib
import json
import re
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from dnsserver import DNSServer
from prometheus_client.parser import text_string_to_metric_families

# The first test also waits for the session's container: a base rootfs build on a new
# machine (~2 min) and the first apply (~2 min).
pytestmark = [pytest.mark.container, pytest.mark.timeout(1500)]

#: An authoritative server for the relay's made-up domain, on the host (the container shares
#: its network). The API queries authoritative servers on port 53, so NSD listens there, on
#: a loopback address of its own (the relay's unbound has 127.0.0.1:53).
NS_ADDRESS = "127.0.0.153"
#: The relay's address in the published zone: any address passes the A check, and one of
#: its own gets a PTR without touching localhost's.
RELAY_ADDRESS = "127.0.0.154"
API_PORT = 8077
TOKENS_FILE = "/etc/chatmail/api-tokens.json"
STATS_UNIT = "chatmail-account-stats.service"
STATS_FILE = "/var/lib/chatmail/account-stats/stats.json"


@pytest.fixture(scope="module")
def api(relay):
    """An HTTP client for the API; ``api.monitor`` / ``api.admin`` are bearer headers."""
    relay.container.wait_for_port(API_PORT, timeout=60)
    tokens = json.loads(relay.container.read_file(TOKENS_FILE))
    assert set(tokens) == {"monitor", "admin"}, tokens.keys()
    ((_, monitor),) = tokens["monitor"].items()
    ((admin_name, admin),) = tokens["admin"].items()
    with httpx.Client(base_url=f"http://127.0.0.1:{API_PORT}", timeout=60) as client:
        client.monitor = {"Authorization": f"Bearer {monitor}"}
        client.admin = {"Authorization": f"Bearer {admin}"}
        client.admin_name = admin_name
        yield client


def _reverse(address: str) -> str:
    return ".".join(reversed(address.split("."))) + ".in-addr.arpa."


class _Port53Server(DNSServer):
    host = NS_ADDRESS

    def __init__(self, directory):
        super().__init__(directory)
        self.port = 53


@pytest.fixture(scope="module")
def published_zone(api, relay, tmp_path_factory):
    """The zone ``GET /dns/zone`` proposes, served by a real NSD the relay's resolver
    delegates to, as the DNS provider would after the operator pasted it; yields the text.

    A made-up ``_`` domain has no parent zone, so the relay's unbound gets the delegation
    (SOA, NS and the name server's address) as local data; the API then finds NSD as the
    domain's authoritative server and queries it directly, as it would the provider's."""
    d = relay.domain
    resp = api.get("/dns/zone", headers=api.monitor)
    assert resp.status_code == 200, resp.text
    records = [line for line in resp.text.splitlines() if line and not line.startswith(";")]
    if not any(line.split()[:1] == [f"{d}."] and " A " in line for line in records):
        records.append(f"{d}. A {RELAY_ADDRESS}")  # the zone asks to add one (no DNS yet)
    records.append(f"ns.{d}. A {NS_ADDRESS}")
    delegation = [
        f"{d}. 60 IN SOA ns.{d}. hostmaster.{d}. 1 3600 600 86400 60",
        f"{d}. 60 IN NS ns.{d}.",
        f"ns.{d}. 60 IN A {NS_ADDRESS}",
        f"{_reverse(RELAY_ADDRESS)} 60 IN PTR {d}.",  # recommended: PTR = the domain
    ]
    with _Port53Server(tmp_path_factory.mktemp("nsd")) as server:
        server.set_zone(d, records)
        assert server.port == 53, f"port 53 on {NS_ADDRESS} is taken"
        try:
            for record in delegation:
                relay.local_data(record)
            yield resp.text
        finally:
            # Unless the container already went with the folder's last test.
            for name in (f"{d}.", f"ns.{d}.", _reverse(RELAY_ADDRESS)):
                if relay.container.is_running():
                    relay.container.run(["unbound-control", "local_data_remove", name])


def _failing(status: dict, not_yet_run: tuple[str, ...] = ()) -> str:
    """The checks that are not ok, one line each with the hint; ``not_yet_run`` ids may
    still be ``unknown`` (the scheduled probe runs only some time after the API started)."""
    return "\n".join(
        f"  {c['id']} [{c['severity']}] {c['state']}: {c['summary']} -- hint: {c['hint']}"
        for c in status["checks"]
        if c["state"] != "ok" and not (c["id"] in not_yet_run and c["state"] == "unknown")
    )


def _metrics(api) -> dict[str, list]:
    """{family name: samples} of one /metrics scrape."""
    resp = api.get("/metrics", headers=api.monitor)
    assert resp.status_code == 200, resp.text
    return {f.name: f.samples for f in text_string_to_metric_families(resp.text)}


def _value(families: dict, sample_name: str, **labels: str) -> float | None:
    family = families.get(sample_name.removesuffix("_total"), [])
    for sample in family:
        if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return None


def _login_fails(relay, addr: str, password: str) -> bool:
    try:
        with relay.imap(addr, password):
            return False
    except imaplib.IMAP4.error:
        return True


# --- health, status, authentication -------------------------------------------------------


def test_health_needs_no_token(api):
    resp = api.get("/health")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"status": "ok"}


def test_dns_report_ok_once_the_zone_is_published(api, published_zone):
    resp = api.get("/dns", headers=api.monitor)
    assert resp.status_code == 200, resp.text
    report = resp.json()
    wrong = [r for r in report["records"] if r["state"] != "ok"]
    assert report["ok"], report["problems"]
    assert not wrong and not report["problems"], (wrong, report["problems"])
    assert report["nameservers"] == [NS_ADDRESS], report["nameservers"]
    types = {r["type"] for r in report["records"]}
    assert {"A", "MX", "TXT", "CNAME", "SRV"} <= types, types


def test_status_all_checks_ok(api, relay, published_zone):
    api.get("/dns", headers=api.monitor)  # a fresh DNS check (the scheduled one is hourly)
    resp = api.get("/status", headers=api.monitor)
    assert resp.status_code == 200, resp.text
    status = resp.json()
    assert status["mail_domain"] == relay.domain
    ids = {c["id"] for c in status["checks"]}
    mta = f"service.{relay.platform.mta_unit}"
    for expected in ("service.dovecot", mta, "service.doveauth", "tls.expiry"):
        assert expected in ids, sorted(ids)
    failing = _failing(status, not_yet_run=("probe.e2e",))
    assert not failing, f"status {status['status']}; checks not ok:\n{failing}"
    assert status["status"] == "ok"


def test_missing_or_unknown_token_is_401_with_reason(api):
    for headers in ({}, {"Authorization": "Bearer not-a-token-of-this-relay"}):
        resp = api.get("/status", headers=headers)
        assert resp.status_code == 401, resp.text
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.json()["detail"], resp.text


def test_monitor_token_on_admin_endpoint_is_403(api):
    resp = api.put("/account-creation", headers=api.monitor, json={"enabled": True})
    assert resp.status_code == 403, resp.text
    assert "admin" in resp.json()["detail"]
    resp = api.post("/probe", headers=api.monitor)
    assert resp.status_code == 403, resp.text


# --- DNS zone -------------------------------------------------------------------------------


def test_dns_zone_has_mx_and_the_real_dkim_key(api, relay):
    resp = api.get("/dns/zone", headers=api.monitor)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/dns")
    lines = [line.split() for line in resp.text.splitlines() if not line.startswith(";")]
    d = relay.domain
    mx = [f for f in lines if f and f[0].rstrip(".") == d and "MX" in f]
    assert mx and mx[0][-2:] == ["10", f"{d}."], resp.text
    dkim_lines = [
        line
        for line in resp.text.splitlines()
        if line.startswith(f"opendkim._domainkey.{d}.") and " TXT " in f" {line} "
    ]
    assert len(dkim_lines) == 1, resp.text
    published = "".join(re.findall(r'"([^"]*)"', dkim_lines[0]))
    key_on_disk = relay.dkim_public_txt()  # /etc/dkimkeys/opendkim.txt, strings joined
    p_zone = re.search(r"p=([A-Za-z0-9+/=]+)", published).group(1)
    p_disk = re.search(r"p=([A-Za-z0-9+/=]+)", key_on_disk).group(1)
    assert len(p_disk) > 300  # a 2048-bit RSA key
    assert p_zone == p_disk
    # BIND strings are at most 255 bytes each
    assert all(len(s) <= 255 for s in re.findall(r'"([^"]*)"', dkim_lines[0]))


# --- metrics --------------------------------------------------------------------------------


def test_metrics_count_new_accounts(api, relay):
    before = _metrics(api)
    for family in before.values():
        for sample in family:
            assert not any("@" in v for v in sample.labels.values()), sample
    created_before = _value(before, "chatmail_accounts_created_total") or 0.0
    assert _value(before, "chatmail_build_info") == 1
    assert _value(before, "chatmail_registration_open") == 1

    for _ in range(2):
        relay.new_account()

    deadline = time.monotonic() + 10
    while True:
        after = _metrics(api)
        created = _value(after, "chatmail_accounts_created_total") or 0.0
        if created >= created_before + 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert created >= created_before + 2, (created_before, created)
    for family in after.values():
        for sample in family:
            assert not any("@" in v for v in sample.labels.values()), sample

    # The account gauges come from a file the stats timer writes as vmail; run it now:
    # /metrics serves the new file at once.
    def on_disk() -> int:
        return int(
            relay.container.run(
                f"find /home/vmail/mail/{relay.domain} -mindepth 1 -maxdepth 1 -type d -name '*@*'"
                " | wc -l"
            ).stdout
        )

    before_scan = on_disk()
    triggered = time.time()
    relay.container.run(["systemctl", "start", STATS_UNIT])
    stats = json.loads(relay.container.read_file(STATS_FILE))
    deadline = time.monotonic() + 10
    while True:
        families = _metrics(api)
        scanned = _value(families, "chatmail_account_scan_timestamp_seconds") or 0.0
        if scanned >= triggered - 1 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert scanned >= triggered - 1, f"the API still serves the scan of {scanned}: {stats}"
    accounts = _value(families, "chatmail_accounts", kind="all")
    assert accounts is not None and accounts >= 2, families.get("chatmail_accounts")
    # every account directory counted, nothing more (the API's scheduled probe may create
    # an account while this runs: bounded by the counts before and after the scan)
    after_scan = on_disk()
    assert before_scan <= accounts <= after_scan, (before_scan, accounts, after_scan, stats)


# --- probe ----------------------------------------------------------------------------------


def test_probe_succeeds_and_shows_in_status_and_metrics(api, published_zone):
    resp = api.post("/probe", headers=api.admin)
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["ok"], result
    assert 0 < result["duration_s"] < 30

    status = api.get("/status", headers=api.monitor).json()
    probe = [c for c in status["checks"] if c["id"] == "probe.e2e"]
    assert probe and probe[0]["state"] == "ok", probe or sorted(c["id"] for c in status["checks"])
    failing = _failing(status)  # now every check, the probe included
    assert not failing and status["status"] == "ok", f"checks not ok:\n{failing}"
    families = _metrics(api)
    assert _value(families, "chatmail_probe_success") == 1
    assert _value(families, "chatmail_probe_duration_seconds") > 0


# --- the account-creation toggle, seen by a real first IMAP login -----------------------------


def _open(api, relay) -> None:
    resp = api.put("/account-creation", headers=api.admin, json={"enabled": True})
    if resp.status_code != 200:  # never leave the shared relay closed
        target = relay.container.run(["readlink", "-f", "/etc/chatmail-nocreate"]).stdout.strip()
        relay.container.run(["rm", "-f", target])
        pytest.fail(f"re-opening account creation: {resp.status_code} {resp.text}")


def test_toggle_blocks_and_allows_first_login(api, relay):
    existing, existing_password = relay.new_account()
    addr, password = relay.gencreds()
    try:
        resp = api.put(
            "/account-creation", headers=api.admin, json={"enabled": False, "reason": "e2e"}
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["enabled"] is False and resp.json()["closed_by_file"] is True
        assert relay.account_exists(existing)

        assert _login_fails(relay, addr, password)
        assert not relay.account_exists(addr)
        with relay.imap(existing, existing_password) as conn:
            assert conn.noop()[0] == "OK"

        shown = api.get("/account-creation", headers=api.monitor).json()
        assert shown["enabled"] is False
        assert shown["reason"] == "e2e"
        assert shown["by"] == api.admin_name
        assert shown["since"]
        families = _metrics(api)
        assert _value(families, "chatmail_registration_open") == 0

        resp = api.put("/account-creation", headers=api.admin, json={"enabled": True})
        assert resp.status_code == 200, resp.text
        assert resp.json()["enabled"] is True
    finally:
        _open(api, relay)
    with relay.imap(addr, password) as conn:
        assert conn.noop()[0] == "OK"
    assert relay.account_exists(addr)


def test_toggle_until_reopens_by_itself(api, relay):
    """Closed until a few seconds from now: the API's own timer re-opens, no request needed."""
    addr, password = relay.gencreds()
    until = datetime.now(UTC) + timedelta(seconds=3)
    try:
        resp = api.put(
            "/account-creation",
            headers=api.admin,
            json={"enabled": False, "reason": "e2e until", "until": until.isoformat()},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["until"]
        assert _login_fails(relay, addr, password)
        # No API calls from here: the re-open task (every 30 s) removes the nocreate file.
        deadline = time.monotonic() + 45
        while _login_fails(relay, addr, password):
            assert time.monotonic() < deadline, "account creation did not re-open by itself"
            time.sleep(1)
        assert relay.account_exists(addr)
        shown = api.get("/account-creation", headers=api.monitor).json()
        assert shown["enabled"] is True and shown["until"] is None, shown
    finally:
        _open(api, relay)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"enabled": False, "colour": "red"},  # unknown field
        {"enabled": "sometimes"},  # wrong type
        {"enabled": False, "reason": ["e2e"]},
        {"reason": "no enabled"},
        {"enabled": False, "until": "next tuesday"},
        {"enabled": False, "until": "2001-01-01T00:00:00Z"},  # in the past
        [],
    ],
)
def test_bad_toggle_input_is_422_with_reason(api, relay, body):
    try:
        resp = api.put("/account-creation", headers=api.admin, json=body)
        assert resp.status_code == 422, resp.text
        assert resp.headers["content-type"].startswith("application/json")
        assert isinstance(resp.json()["detail"], str) and resp.json()["detail"]
        shown = api.get("/account-creation", headers=api.monitor).json()
        assert shown["enabled"] is True, shown
    finally:
        _open(api, relay)


def test_non_json_body_is_422_not_5xx(api, relay):
    resp = api.put(
        "/account-creation",
        headers={**api.admin, "Content-Type": "application/json"},
        content=b"{not json",
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"]
