"""Relay-to-relay delivery over HTTPS (POST /mxdeliv) in the fleet lab.

Every relay gets the HTTPS-first transport (daemons:mxtransport) from the master: the
Postfix ones (relay1, relay3, the IP-address relay relay4) as Postfix's default transport,
the OpenSMTPD one (relay2) through smtpd's LMTP delivery agent; every relay receives on /mxdeliv by default. Port 25
between two relays is then closed by an nftables rule in the sender's network namespace
(removed again by the test), and mail still arrives, over HTTPS, both ways between Postfix
and OpenSMTPD, Delta Chat's included. Without /mxdeliv on the receiver, each MTA's own SMTP
client takes over (the SMTP channel), and HTTPS is tried again after the remembered period.
"""

from __future__ import annotations

import http.client
import json
import re
import statistics
import subprocess
import time
from contextlib import ExitStack, contextmanager

import lab as labctl
import pytest
from relayclient import encrypted_mail, message_id, plain_mail, unverified_context
from fleetclient import Account, online_account, outbound_session, wait_for_text
from test_fleet import TLS_LOG

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

HTTPS_SENDERS = ("relay1", "relay2", "relay3", "relay4")  # Postfix, OpenSMTPD, Postfix, Postfix
MTA = {"relay1": "postfix", "relay2": "opensmtpd", "relay3": "postfix", "relay4": "postfix"}
RETRY_AFTER = 60  # s: mxdeliv_retry_after in the lab, so the test can wait it out
NFT_TABLE = "chatmail_lab_mxdeliv"


@pytest.fixture(scope="module")
def https_fleet(dns_filled):
    """The fleet with the HTTPS-first transport on every relay."""
    dns_filled.write_pillar(
        settings={m: {"mxdeliv_retry_after": RETRY_AFTER} for m in HTTPS_SENDERS},
        overrides={m: {"daemons": {"mxtransport": True}} for m in HTTPS_SENDERS},
    )
    results = dns_filled.apply("relay*")
    summary = "\n".join(f"{m}: {r.summary()}" for m, r in sorted(results.items()))
    assert set(results) == set(HTTPS_SENDERS) and all(r.ok for r in results.values()), summary
    return dns_filled


@pytest.fixture(scope="module")
def users(https_fleet) -> dict[str, Account]:
    created = {relay.minion_id: Account(relay) for relay in https_fleet.relays}
    for account in created.values():
        with account.imap():
            pass
    return created


@contextmanager
def port_blocked(host, address: str, port: int = 25):
    """``host`` cannot open TCP connections to ``address:port`` (a rule in its namespace)."""
    netns = ["nsenter", "-t", str(host.init_pid), "-n", "nft"]
    rules = (
        f"table ip {NFT_TABLE} {{\n"
        "    chain output {\n"
        "        type filter hook output priority 0; policy accept;\n"
        f"        ip daddr {address} tcp dport {port} reject with tcp reset\n"
        "    }\n"
        "}\n"
    )
    subprocess.run([*netns, "-f", "-"], input=rules, text=True, check=True)
    try:
        yield
    finally:
        subprocess.run([*netns, "delete", "table", "ip", NFT_TABLE], check=False)


def journal(host, since: float, *match: str) -> list[str]:
    """Log lines since ``since`` of a unit (``-u NAME``) or syslog identifier (``-t NAME``)."""
    cmd = ["journalctl", "--no-pager", "-o", "cat", f"--since=@{since:.0f}", *match]
    return host.run(cmd).stdout.splitlines()


def channel_lines(host, to_addr: str, since: float) -> list[str]:
    return [line for line in journal(host, since, "-u", "mxtransport") if f"to=<{to_addr}>" in line]


def cannot_connect(host, address: str, port: int) -> bool:
    script = (
        "import socket, sys\n"
        "try:\n"
        "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    return host.run(["python3", "-c", script, address, str(port)], check=False).returncode != 0


def https_accepted(host) -> float:
    """The sender's /metrics: deliveries chatmail-mxtransport made over HTTPS."""
    text = labctl.api_get(host, "/metrics")
    found = re.search(
        r'^chatmail_outbound_deliveries_total\{channel="https",result="accepted"\} (\S+)$',
        text,
        re.MULTILINE,
    )
    return float(found.group(1)) if found else 0.0


def mta_delivered_over_https(host, minion_id: str, to_addr: str, since: float) -> bool:
    """The sender MTA's own log line of the hand-over to the transport."""
    if MTA[minion_id] == "postfix":
        # the LMTP reply names the channel
        lines = journal(host, since, "-t", "postfix/mxtransport/lmtp")
        return any(f"to=<{to_addr}>" in line and "channel=https" in line for line in lines)
    # smtpd's LMTP delivery agent (as smtpd's own user) logs no reply text
    lines = journal(host, since, "-u", "opensmtpd")
    return any(
        " mda delivery " in line and f"to=<{to_addr}>" in line and "result=Ok" in line
        and "user=opensmtpd " in line
        for line in lines
    )  # fmt: skip


ROUTES = [
    ("relay1", "relay2"),  # Postfix -> OpenSMTPD
    ("relay2", "relay1"),  # OpenSMTPD -> Postfix
    ("relay2", "relay3"),  # OpenSMTPD -> the `_` relay (TLS unverified)
    ("relay1", "relay3"),
    ("relay3", "relay1"),
    # the IP relay is posted to at https://198.18.0.14/mxdeliv, its certificate unverified
    ("relay1", "relay4"),
    ("relay4", "relay1"),
]


@pytest.mark.parametrize(("source", "destination"), ROUTES, ids=["->".join(r) for r in ROUTES])
def test_mail_crosses_over_https_when_port_25_is_blocked(https_fleet, users, source, destination):
    sender, recipient = users[source], users[destination]
    host = https_fleet.relay(source)
    since = time.time() - 1
    before = https_accepted(host)
    with port_blocked(host, recipient.relay.address):
        assert cannot_connect(host, recipient.relay.address, 25)
        msgid = message_id(sender.relay.domain)
        started = time.monotonic()
        sender.send([recipient.addr], encrypted_mail(sender.addr, [recipient.addr], msgid))
        raw = recipient.wait_for(msgid)
        print(f"\n{source} -> {destination} over HTTPS: {time.monotonic() - started:.1f} s")
    assert b"-----BEGIN PGP MESSAGE-----" in raw
    if MTA[source] == "opensmtpd":
        # the (Postfix) receiver's delivery headers only: those smtpd's LMTP agent wrote on
        # top for the sender's transport were cut off again
        head = raw.split(b"\r\n\r\n", 1)[0]
        assert head.count(b"Return-Path:") == 1 and head.count(b"Delivered-To:") <= 1, head
    sent = channel_lines(host, recipient.addr, since)
    assert any("channel=https result=accepted" in line for line in sent), sent
    assert not any("channel=smtp" in line for line in sent), sent
    assert mta_delivered_over_https(host, source, recipient.addr, since)
    deadline = time.monotonic() + 30  # counters reach the file within a second or so
    while https_accepted(host) < before + 1:
        assert time.monotonic() < deadline, ("/metrics", before, https_accepted(host))
        time.sleep(1)
    received = journal(https_fleet.relay(destination), since, "-u", "mxdeliv")
    assert any(f"from=<{sender.addr}>" in line and "status=200" in line for line in received)


def test_delta_chat_both_ways_over_https_with_port_25_blocked(https_fleet, deltachat):
    """Postfix (relay1) and OpenSMTPD (relay2) with port 25 closed both ways: securejoin
    and messages with padlock cross, and every one of them went over HTTPS."""
    first, second = (next(r for r in https_fleet.relays if r.minion_id == m)
                     for m in ("relay1", "relay2"))  # fmt: skip
    hosts = {m: https_fleet.relay(m) for m in ("relay1", "relay2")}
    since = time.time() - 1
    with ExitStack() as stack:
        stack.enter_context(port_blocked(hosts["relay1"], second.address))
        stack.enter_context(port_blocked(hosts["relay2"], first.address))
        ac1 = online_account(deltachat, first)
        ac2 = online_account(deltachat, second)
        ac2.secure_join(ac1.get_qr_code())
        ac1.wait_for_securejoin_inviter_success()
        ac2.wait_for_securejoin_joiner_success()
        for sender, receiver in ((ac1, ac2), (ac2, ac1)):
            text = f"over HTTPS from {sender.relay.minion_id}"
            sender.create_chat(receiver).send_text(text)
            got = wait_for_text(receiver, text)
            assert got.show_padlock, f"{sender.addr} -> {receiver.addr} arrived unencrypted"
    for minion_id, to_addr in (("relay1", ac2.addr), ("relay2", ac1.addr)):
        sent = channel_lines(hosts[minion_id], to_addr, since)
        assert sent and all("channel=https result=accepted" in line for line in sent), sent


@contextmanager
def mxdeliv_location_removed(host, relay):
    """nginx without its /mxdeliv location: a POST there gets a web server's error page."""
    conf_path = "/etc/nginx/nginx.conf"
    original = host.read_file(conf_path)
    stripped = re.sub(r"\n\s*location = /mxdeliv \{.*?\n\s*\}", "", original, flags=re.DOTALL)
    assert stripped != original
    host.write_file(conf_path, stripped)
    host.run(["sh", "-c", "nginx -t && systemctl reload nginx"])
    deadline = time.monotonic() + 30
    while True:  # until the reloaded workers answer: a web server's error page
        status, text = post(relay, b"x", "a@b.example", ["x@" + relay.domain])
        if "<html>" in text:
            break
        assert time.monotonic() < deadline, ("/mxdeliv still answers", status, text)
        time.sleep(1)
    try:
        yield
    finally:
        host.write_file(conf_path, original)
        host.run(["sh", "-c", "nginx -t && systemctl reload nginx"])


FALLBACKS = [("relay1", "relay2"), ("relay2", "relay1")]


@pytest.mark.parametrize(("source", "destination"), FALLBACKS,
                         ids=["->".join(r) for r in FALLBACKS])  # fmt: skip
def test_without_mxdeliv_mail_goes_over_smtp_and_https_is_tried_again_later(
    https_fleet, users, source, destination
):
    """The receiver's nginx without /mxdeliv: the sender's own SMTP client delivers (Postfix's
    content_filter, OpenSMTPD's smtp_channel listener), verified TLS on port 25."""
    sender, recipient = users[source], users[destination]
    host, peer = https_fleet.relay(source), https_fleet.relay(destination)
    since = time.time() - 1
    with mxdeliv_location_removed(peer, recipient.relay):
        for _ in range(2):  # the second one does not ask over HTTPS again
            msgid = message_id(sender.relay.domain)
            sender.send([recipient.addr], encrypted_mail(sender.addr, [recipient.addr], msgid))
            recipient.wait_for(msgid)
        first_tried = time.time()
    sent = channel_lines(host, recipient.addr, since)
    assert sum("channel=smtp result=accepted" in line for line in sent) == 2, sent
    assert sum("channel=https result=failed" in line for line in sent) == 1, sent
    assert "remembered without /mxdeliv" in sent[-1], sent
    # the MTA's own SMTP client took them, with the TLS policy of port 25 (verified)
    smtp = outbound_session(host, MTA[source], recipient.addr)
    assert any(TLS_LOG[(MTA[source], True)] in line for line in smtp), smtp
    time.sleep(max(0.0, first_tried + RETRY_AFTER + 1 - time.time()))
    since = time.time() - 1
    msgid = message_id(sender.relay.domain)
    sender.send([recipient.addr], encrypted_mail(sender.addr, [recipient.addr], msgid))
    recipient.wait_for(msgid)
    sent = channel_lines(host, recipient.addr, since)
    assert any("channel=https result=accepted" in line for line in sent), sent


def test_opensmtpd_sender_hands_a_refusal_to_smtp_and_the_sender_hears_of_it(https_fleet, users):
    """smtpd 7.6 would retry an LMTP 5xx for days (OpenSMTPD issue #1276): its transport
    hands a refusal over HTTPS to the SMTP channel instead, the receiver's port 25 takes it
    as Postfix takes unknown recipients, and its bounce reaches the sender."""
    sender = users["relay2"]
    host = https_fleet.relay("relay2")
    unknown = f"nobody{int(time.time())}@{users['relay1'].relay.domain}"
    since = time.time() - 1
    msgid = message_id(sender.relay.domain)
    sender.send([unknown], encrypted_mail(sender.addr, [unknown], msgid))
    report = sender.search("TEXT", unknown, timeout=180)
    assert report, unknown
    sent = channel_lines(host, unknown, since)
    assert any("channel=https result=refused" in line and "550 5.1.1" in line for line in sent)
    assert any("channel=smtp result=accepted" in line for line in sent), sent


# --- refusals: what port 25 refuses, /mxdeliv refuses with the same SMTP reply -----------


def post(relay, body: bytes, mail_from: str | None, rcpts: list[str], length: int | None = None):
    conn = http.client.HTTPSConnection(relay.address, 443, context=unverified_context(), timeout=60)
    conn.putrequest("POST", "/mxdeliv", skip_host=True)
    conn.putheader("Host", relay.domain)
    if mail_from is not None:
        conn.putheader("X-Mail-From", mail_from)
    for rcpt in rcpts:
        conn.putheader("X-Mail-To", rcpt)
    conn.putheader("Content-Length", str(len(body) if length is None else length))
    conn.endheaders()
    try:
        conn.send(body)
    except OSError:
        pass  # nginx may answer (and close) before a large body is sent
    response = conn.getresponse()
    text = response.read().decode("utf-8", "replace")
    conn.close()
    return response.status, text


@pytest.mark.parametrize("destination", ["relay1", "relay2"])  # Postfix, OpenSMTPD
def test_refusals_over_https_carry_the_smtp_reply(https_fleet, users, destination):
    recipient = users[destination]
    relay = recipient.relay
    outsider = "mallory@relay3.lab.example"  # no such relay in DNS: no DKIM key either
    cases = [
        ("cleartext", plain_mail(outsider, [recipient.addr], "<c1@x>"), outsider,
         [recipient.addr], 403, "523 Encryption Needed"),
        ("no DKIM signature", encrypted_mail(outsider, [recipient.addr], "<c2@x>"), outsider,
         [recipient.addr], 403, "5"),
        ("unknown recipient", encrypted_mail(outsider, [recipient.addr], "<c3@x>"), outsider,
         [f"nobody@{relay.domain}"], 404, "550 5.1.1"),
        ("no X-Mail-To", encrypted_mail(outsider, [recipient.addr], "<c4@x>"), outsider, [],
         400, "500 Missing X-Mail-To"),
        ("garbage", b"\xff\xfe garbage", outsider, [recipient.addr], 403, "554 Non-UTF-8"),
    ]  # fmt: skip
    for name, body, mail_from, rcpts, status, reply in cases:
        got = post(relay, body, mail_from, rcpts)
        assert got[0] == status and got[1].startswith(reply), (name, got)
        if name == "no DKIM signature":
            assert "DKIM" in got[1], got
    big = post(relay, b"x" * 65536, outsider, [recipient.addr], length=100 << 20)
    assert big == (413, "552 Message exceeds maximum size"), big
    # the listener keeps serving
    assert post(relay, b"\xff", outsider, [recipient.addr])[0] == 403
    counters = json.loads(
        https_fleet.relay(destination).read_file("/var/lib/chatmail/counters/mxdeliv.json")
    )
    assert counters["mxdeliv_received_total"], counters


def test_latency_https_vs_smtp(https_fleet, users):
    """Median relay1 -> relay2 delivery time (submission to IMAP) over each channel, same run."""
    sender, recipient = users["relay1"], users["relay2"]

    def deliver() -> float:
        msgid = message_id(sender.relay.domain)
        started = time.monotonic()
        sender.send([recipient.addr], encrypted_mail(sender.addr, [recipient.addr], msgid))
        recipient.wait_for(msgid)
        return time.monotonic() - started

    samples = 5
    https = [deliver() for _ in range(samples)]
    with mxdeliv_location_removed(https_fleet.relay("relay2"), recipient.relay):
        deliver()  # the first one finds /mxdeliv gone; the rest go straight to SMTP
        smtp = [deliver() for _ in range(samples)]
    median_https, median_smtp = statistics.median(https), statistics.median(smtp)
    print(
        f"\nrelay1 -> relay2, median of {samples}: HTTPS {median_https:.2f} s,"
        f" SMTP {median_smtp:.2f} s, ratio HTTPS/SMTP {median_https / median_smtp:.2f}"
    )
    assert median_https < 30 and median_smtp < 30
