"""POST /mxdeliv against the relay applied in a container: another relay's delivery over
HTTPS passes nginx, the port-25 checks and the real MTA (Postfix's reinject_incoming
listener, OpenSMTPD's loopback listener) into Dovecot; what port 25 refuses, /mxdeliv
refuses with the same SMTP reply."""

from __future__ import annotations

import http.client
import time

import dkim
import pytest
from relayclient import (
    HOST,
    dkim_keypair,
    encrypted_mail,
    message_id,
    plain_mail,
    unverified_context,
)

pytestmark = [pytest.mark.container, pytest.mark.timeout(1500)]

SENDER_DOMAIN, SELECTOR = "_mxsender.test", "mx2026"


def post(relay, body: bytes, mail_from: str | None, rcpts: list[str], length: int | None = None):
    conn = http.client.HTTPSConnection(HOST, 443, context=unverified_context(), timeout=60)
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
        pass  # nginx answered (and closed) before taking a large body
    response = conn.getresponse()
    text = response.read().decode("utf-8", "replace")
    conn.close()
    return response.status, text


@pytest.fixture(scope="module")
def signer(relay):
    """sign(msg) -> msg with a DKIM signature of SENDER_DOMAIN, whose key the relay's
    resolver serves."""
    private_pem, public_b64 = dkim_keypair()
    relay.publish_txt(f"{SELECTOR}._domainkey.{SENDER_DOMAIN}", f"v=DKIM1; k=rsa; p={public_b64}")

    def sign(msg: bytes) -> bytes:
        headers = [b"from", b"to", b"subject", b"date", b"message-id", b"content-type"]
        return (
            dkim.sign(
                msg, SELECTOR.encode(), SENDER_DOMAIN.encode(), private_pem, include_headers=headers
            )
            + msg
        )

    return sign


def test_signed_encrypted_mail_over_https_reaches_the_inbox(relay, signer):
    rcpt, password = relay.new_account()
    sender = f"alice@{SENDER_DOMAIN}"
    msgid = message_id(SENDER_DOMAIN)
    status, text = post(relay, signer(encrypted_mail(sender, [rcpt], msgid)), sender, [rcpt])
    assert status == 200 and text.startswith("250"), (status, text)
    raw = relay.fetch_inbox_message(rcpt, password, msgid)
    assert b"-----BEGIN PGP MESSAGE-----" in raw
    # delivered like port-25 mail: our DKIM check's subject is stripped at final delivery
    assert b"DKIM-Signature" not in raw.split(b"\r\n\r\n", 1)[0]


def test_port_25_refusals_are_https_refusals_and_the_listener_keeps_serving(relay, signer):
    rcpt, password = relay.new_account()
    sender = f"alice@{SENDER_DOMAIN}"
    unsigned = "alice@_unsigned.test"
    cases = [
        ("cleartext", plain_mail(sender, [rcpt], "<p1@x>"), sender, [rcpt], 403,
         "523 Encryption Needed"),
        ("unsigned", encrypted_mail(unsigned, [rcpt], "<p2@x>"), unsigned, [rcpt], 403, "5"),
        ("tampered", signer(encrypted_mail(sender, [rcpt], "<p3@x>")).replace(b"Subject: ...",
         b"Subject: ..!"), sender, [rcpt], 403, "5"),
        ("unknown recipient", signer(encrypted_mail(sender, [rcpt], "<p4@x>")), sender,
         [f"nobody@{relay.domain}"], 404, "550 5.1.1"),
        ("other domain", signer(encrypted_mail(sender, [rcpt], "<p5@x>")), sender,
         ["bob@elsewhere.example"], 404, "554 5.7.1"),
        ("no X-Mail-To", b"x", sender, [], 400, "500 Missing X-Mail-To"),
        ("garbage", b"\xff\xfe\x00garbage", sender, [rcpt], 403, "554 Non-UTF-8"),
    ]  # fmt: skip
    for name, body, mail_from, rcpts, status, reply in cases:
        got = post(relay, body, mail_from, rcpts)
        assert got[0] == status and got[1].startswith(reply), (name, got)
        if name in ("unsigned", "tampered"):
            assert "5.7.1" in got[1], (name, got)
    assert post(relay, b"x" * 65536, sender, [rcpt], length=100 << 20) == (
        413,
        "552 Message exceeds maximum size",
    )
    msgid = message_id(SENDER_DOMAIN)
    status, _ = post(relay, signer(encrypted_mail(sender, [rcpt], msgid)), sender, [rcpt])
    assert status == 200
    relay.fetch_inbox_message(rcpt, password, msgid)


def journal(relay, *match: str) -> str:
    return relay.container.run(["journalctl", "--no-pager", "-o", "cat", *match]).stdout


def wait_for_line(relay, needles: tuple[str, ...], *match: str, timeout: float = 60) -> str:
    """The last log line (``journalctl MATCH``) that holds every one of ``needles``."""
    deadline = time.monotonic() + timeout
    while True:
        text = journal(relay, *match)
        lines = [line for line in text.splitlines() if all(n in line for n in needles)]
        if lines:
            return lines[-1]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {needles} in {match} after {timeout} s:\n{text[-3000:]}")
        time.sleep(0.5)


@pytest.fixture
def https_first(relay, relay_pillar):
    """The relay with the HTTPS-first transport (daemons.mxtransport) and a _ peer domain
    that resolves to this very relay, so its own nginx and /mxdeliv answer (refusing: the
    peer is not our domain). Switched off again after the test, as an operator would."""
    container = relay.container
    pillar = relay_pillar()
    pillar["chatmail"]["daemons"] = {"mxtransport": True}
    container.configure_salt(pillar)
    try:
        result = container.apply()
        assert result.ok, result.summary()
        relay.local_data("_peer.test. 300 IN A 127.0.0.1")
        yield container
    finally:
        container.run(["systemctl", "start", "mxdeliv"], check=False)
        container.configure_salt(relay_pillar())
        result = container.apply()
    assert result.ok, result.summary()
    if relay.platform.mta == "postfix":
        assert "default_transport" not in container.read_file("/etc/postfix/main.cf")
    else:
        conf = container.read_file("/etc/smtpd.conf")
        assert "smtp_channel" not in conf and 'action "mxtransport" relay tls' in conf


@pytest.mark.on_platforms("debian12-postfix", "debian13-postfix")
def test_postfix_sends_over_https_first_and_falls_back_to_its_smtp_client(
    relay, https_first
):
    """The HTTPS-first transport with the real Postfix: over HTTPS to the peer (this relay),
    then, with /mxdeliv gone, the SMTP channel (Postfix's smtp client, port 25)."""
    container = https_first
    assert "default_transport = mxtransport:inet:127.0.0.1:10083" in container.read_file(
        "/etc/postfix/main.cf"
    )
    addr, password = relay.new_account()
    peer = "bob@_peer.test"
    relay.send(465, addr, password, [peer], encrypted_mail(addr, [peer], message_id("x")))
    # over HTTPS: the receiver's refusal is the reply Postfix bounces with
    line = wait_for_line(relay, (f"to=<{peer}>",), "-u", "mxtransport")
    assert "channel=https result=refused relay=_peer.test" in line, line
    bounced = wait_for_line(relay, (f"to=<{peer}>",), "-t", "postfix/mxtransport/lmtp")
    assert "status=bounced" in bounced and "Relay access denied" in bounced, bounced
    # without /mxdeliv (its listener stopped: nginx answers 502): the SMTP channel
    container.run(["systemctl", "stop", "mxdeliv"])
    peer2 = "carol@_peer.test"
    relay.send(465, addr, password, [peer2], encrypted_mail(addr, [peer2], message_id("y")))
    line = wait_for_line(relay, (f"to=<{peer2}>", "channel=smtp"), "-u", "mxtransport")
    assert "channel=smtp result=accepted relay=_peer.test" in line, line
    assert "https: HTTP 502" in line, line
    # queued again for Postfix's smtp client, which tries port 25 of _peer.test
    smtp = wait_for_line(relay, (f"to=<{peer2}>", "status="), "-t", "postfix/smtp")
    assert "relay=" in smtp, smtp


@pytest.mark.on_platforms("debian13-opensmtpd")
def test_opensmtpd_sends_over_https_first_and_hands_refusals_and_failures_to_its_relay(
    relay, https_first
):
    """The HTTPS-first transport behind the real smtpd. smtpd 7.6 would retry an LMTP
    refusal for days, so the transport hands the peer's refusal to the SMTP channel, smtpd's
    relay takes it to port 25 (this relay again), which refuses it there, and smtpd bounces.
    With /mxdeliv gone, the same SMTP channel."""
    container = https_first
    conf = container.read_file("/etc/smtpd.conf")
    assert 'action "mxtransport" lmtp "127.0.0.1:10083"' in conf
    assert 'tag "smtp_channel"' in conf
    addr, password = relay.new_account()
    cases = [("bob@_peer.test", "channel=https result=refused"), ("carol@_peer.test", None)]
    for peer, https in cases:
        if https is None:  # /mxdeliv's listener stopped: nginx answers 502
            container.run(["systemctl", "stop", "mxdeliv"])
        msg = encrypted_mail(addr, [peer], message_id("x"))
        relay.send(465, addr, password, [peer], msg)
        if https:
            line = wait_for_line(relay, (f"to=<{peer}>", "channel=https"), "-u", "mxtransport")
            assert f"{https} relay=_peer.test" in line and "Relay access denied" in line, line
        line = wait_for_line(relay, (f"to=<{peer}>", "channel=smtp"), "-u", "mxtransport")
        assert "channel=smtp result=accepted relay=_peer.test" in line, line
        if https is None:
            assert "https: HTTP 502" in line, line
        # smtpd's SMTP relay (not the transport again) met port 25's refusal: a bounce
        refused = wait_for_line(
            relay, (" mta delivery ", f"to=<{peer}>", "PermFail"), "-u", "opensmtpd"
        )
        assert "Invalid recipient" in refused, refused
    agent = journal(relay, "-u", "opensmtpd")
    assert "user=opensmtpd" in agent and "Loop detected" not in agent
