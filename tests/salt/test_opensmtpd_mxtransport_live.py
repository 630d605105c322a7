"""OpenSMTPD with ``daemons:mxtransport`` for real: Debian 13's smtpd (7.6.0p1) runs the
rendered smtpd.conf (test_opensmtpd_live.py's chroot) and hands other domains' mail to an
LMTP stand-in for chatmail-mxtransport that answers what each test scripts per recipient.

What this proves about the rules and smtpd's LMTP relay (chatmail-mxtransport itself is
tests/chatmaild/test_mxdeliv.py; both together, over HTTPS between relays, the lab's
test_mxdeliv_fleet.py):

- submitted mail for other domains, and smtpd's own bounces, reach the transport
  DKIM-signed, with the envelope intact, one recipient per LMTP transaction, delivered by
  smtpd's LMTP agent as smtpd's own user, with exactly the agent's ``Return-Path`` and
  ``Delivered-To`` lines on top (which chatmail-mxtransport cuts off);
- its replies count per recipient: ``250`` delivered once; ``451`` (neither channel took
  it) stays queued and a retry delivers it without the others being sent twice; ``550``
  stays queued too (smtpd 7.6, OpenSMTPD issue #1276: why the transport does not answer
  refusals with it under OpenSMTPD); a transport that is down loses nothing either;
- the SMTP channel (the loopback listener the transport hands its fallback to) relays over
  SMTP and never back to the transport, and refuses our own domain;
- mail still queued for the transport when it is turned off is not dropped by smtpd's
  restart (an envelope whose action is gone is skipped as an "unknown dispatcher"): it
  leaves over SMTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import smtplib
import threading
import time
from collections.abc import Callable

import dkim
import pytest
from aiosmtpd.lmtp import LMTP
from saltsupport import PLATFORMS
from test_opensmtpd_live import (
    DOMAIN,
    chroot,
    dkim_dns,
    free_ports,
    live_relay,
    login,
    mail,
    new_address,
    run_smtpd,
)

from chatmaild.mxtransport import strip_agent_headers

pytestmark = [
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chroot, overlay mount"),
]

ACCEPTED = "250 2.0.0 Ok: channel=https relay=stand-in"


class ScriptedTransport:
    """chatmail-mxtransport's stand-in: an LMTP server on a fixed loopback port that
    answers each recipient with ``answer(rcpt)`` and records every transaction."""

    def __init__(self, port: int):
        self.port = port
        self.answer: Callable[[str], str] = lambda rcpt: ACCEPTED
        self.transactions: list[tuple[str, list[str], bytes, list[str]]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = None
        self.start()

    def start(self) -> None:
        async def listen():
            return await self.loop.create_server(
                lambda: LMTP(self, hostname="mxtransport"), "127.0.0.1", self.port,
                reuse_address=True,
            )  # fmt: skip

        self.server = asyncio.run_coroutine_threadsafe(listen(), self.loop).result(10)

    def pause(self) -> None:
        """Nothing listens on the port (the daemon stopped)."""
        server = self.server

        async def close():
            server.close()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)

    async def handle_DATA(self, server, session, envelope):
        replies = [self.answer(rcpt) for rcpt in envelope.rcpt_tos]
        self.transactions.append(
            (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content, replies)
        )
        return "\r\n".join(replies)  # LMTP: one reply per recipient

    def accepted(self, rcpt: str) -> list[bytes]:
        return [
            content
            for _, rcpts, content, replies in self.transactions
            for r, reply in zip(rcpts, replies)
            if r == rcpt and reply.startswith("2")
        ]

    def wait_for(self, rcpt: str, timeout: float = 60) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := self.accepted(rcpt):
                return found[0]
            time.sleep(0.2)
        raise AssertionError(f"the transport took nothing for {rcpt}: {self.transactions}")

    def stop(self) -> None:
        self.pause()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def relay(tmp_path_factory, render, dns_server):
    dns_server.set_zone("one.example", [])  # starts NSD: the filters' dns_resolver
    transport_port, smtp_channel_port = free_ports(2)
    transport = ScriptedTransport(transport_port)
    extra = {
        "daemons": {"mxtransport": True},
        "settings": {
            "filtermail_lmtp_port_transport": transport_port,
            "postfix_reinject_port_smtp": smtp_channel_port,
        },
    }
    try:
        with live_relay(tmp_path_factory.mktemp("smtpd-mxtransport"), render,
                        dns_server.address, extra) as started:  # fmt: skip
            yield {**started, "transport": transport, "smtp_channel": smtp_channel_port}
    finally:
        transport.stop()


@pytest.fixture
def transport(relay):
    relay["transport"].answer = lambda rcpt: ACCEPTED
    yield relay["transport"]
    relay["transport"].answer = lambda rcpt: ACCEPTED


def smtpctl(relay, *args: str) -> str:
    return chroot(relay["root"], "smtpctl", *args).stdout


def queued(relay, rcpt: str) -> bool:
    return f"|{rcpt}|" in smtpctl(relay, "show", "queue")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.3)


def log_lines(relay, *needles: str) -> list[str]:
    text = relay["smtpd_log"].read_text()
    return [line for line in text.splitlines() if all(n in line for n in needles)]


def test_rendered_config_hands_other_domains_to_the_transport(relay):
    conf = relay["smtpd_conf"]
    assert f'lmtp "127.0.0.1:{relay["transport"].port}" rcpt-to virtual <transport_user>' in conf
    assert f'port {relay["smtp_channel"]} tag "smtp_channel"' in conf


def test_submitted_mail_for_other_domains_goes_to_the_transport_signed(relay, transport):
    sender = new_address("https")
    rcpts = ["one@one.example", "two@two.example", "three@two.example"]
    with login(relay, sender) as client:
        client.sendmail(sender, rcpts, mail("encrypted", sender, rcpts[0]))
    for rcpt in rcpts:
        content = transport.wait_for(rcpt)
        # the agent's own lines on top, which chatmail-mxtransport cuts off again
        agent = f"Return-Path: <{sender}>\r\nDelivered-To: {rcpt}\r\n".encode()
        assert content.startswith(agent), content[:200]
        message = strip_agent_headers(content, sender, rcpt)
        assert message.startswith(b"DKIM-Signature:")
        assert dkim.verify(message, dnsfunc=dkim_dns(relay))
        assert b"-----BEGIN PGP MESSAGE-----" in message
    mine = [t for t in transport.transactions if set(t[1]) & set(rcpts)]
    # one recipient per LMTP transaction (smtpd's delivery agent), each exactly once
    assert sorted(t[1] for t in mine) == [[r] for r in sorted(rcpts)]
    assert {t[0] for t in mine} == {sender}
    assert not [r for r in relay["sink"].received if set(r[1]) & set(rcpts)]  # not local
    # delivered by the agent as smtpd's own user, not vmail (whose deliveries go to Dovecot)
    user = relay["opensmtpd_user"]
    for rcpt in rcpts:
        wait_until(lambda: log_lines(relay, "mda delivery", f"to=<{rcpt}>"), "a delivery line")
        (line,) = log_lines(relay, "mda delivery", f"to=<{rcpt}>")
        assert f"user={user} " in line and "result=Ok" in line, line


def test_transport_4xx_keeps_the_message_queued_and_5xx_too(relay, transport):
    """Per recipient: 250 is delivered once; 451 (neither channel took it) waits in the
    queue and a retry delivers it, and only it. A 550 waits too: smtpd 7.6's delivery agent
    takes every LMTP error for temporary (OpenSMTPD issue #1276), which is why the transport
    hands refusals to the SMTP channel under OpenSMTPD instead of answering 5xx."""
    sender = new_address("perrcpt")
    ok, refused, later = "ok@one.example", "refused@two.example", "later@three.example"
    answers = {
        ok: ACCEPTED,
        refused: "550 5.7.1 refused by the receiver",
        later: "451 4.4.0 neither channel took it",
    }
    transport.answer = lambda rcpt: answers[rcpt]
    with login(relay, sender) as client:
        client.sendmail(sender, [ok, refused, later], mail("encrypted", sender, ok))
    transport.wait_for(ok)
    for rcpt in (refused, later):
        wait_until(lambda: log_lines(relay, "mda delivery", f"to=<{rcpt}>", "TempFail"),
                   f"a temporary failure for {rcpt}")  # fmt: skip
    assert queued(relay, later) and queued(relay, refused) and not queued(relay, ok)
    transport.answer = lambda rcpt: ACCEPTED
    smtpctl(relay, "schedule", "all")
    transport.wait_for(later)
    transport.wait_for(refused)
    assert len(transport.accepted(ok)) == 1 and len(transport.accepted(later)) == 1
    wait_until(lambda: not queued(relay, later), "the queue to empty")
    assert not [r for r in relay["sink"].received if sender in r[1]]  # no bounce


def test_transport_down_loses_nothing(relay, transport):
    sender, rcpt = new_address("down"), "waiting@one.example"
    transport.pause()
    try:
        with login(relay, sender) as client:
            client.sendmail(sender, [rcpt], mail("encrypted", sender, rcpt))
        wait_until(lambda: log_lines(relay, "mda delivery", f"to=<{rcpt}>", "TempFail"),
                   "a temporary failure")  # fmt: skip
        assert queued(relay, rcpt)
    finally:
        transport.start()
    smtpctl(relay, "schedule", "all")
    transport.wait_for(rcpt)
    assert len(transport.accepted(rcpt)) == 1
    assert not [r for r in relay["sink"].received if sender in r[1]]  # no bounce


def test_smtpd_bounces_for_other_domains_go_to_the_transport(relay, transport):
    """smtpd's own mail (the local socket, tag "own") to another domain: signed, null sender."""
    rcpt = "postmaster@remote-bounce.example"
    message = f"From: MAILER-DAEMON@{DOMAIN}\nTo: {rcpt}\nSubject: report\n\nbody\n"
    chroot(relay["root"], "sendmail", "-f", "", rcpt, input=message)
    content = transport.wait_for(rcpt)
    (mail_from,) = {t[0] for t in transport.transactions if rcpt in t[1]}
    assert mail_from in ("", "<>")
    assert content.startswith(f"Delivered-To: {rcpt}\r\n".encode())  # no Return-Path
    message = strip_agent_headers(content, "", rcpt)
    assert message.startswith(b"DKIM-Signature:")
    assert dkim.verify(message, dnsfunc=dkim_dns(relay))


def test_smtp_channel_relays_over_smtp_never_back_to_the_transport(relay, transport):
    """What the transport hands back (its SMTP fallback) goes to smtpd's SMTP relay: an MX
    lookup of the recipient's domain, which fails here (no such domain); the transport
    never sees it again. Our own domain is refused there."""
    sender = new_address("fallback")
    login(relay, sender).quit()
    rcpt = f"carol@{os.urandom(4).hex()}.invalid"
    with smtplib.SMTP("127.0.0.1", relay["smtp_channel"], timeout=30) as client:
        client.ehlo(DOMAIN)
        assert client.mail(f"someone@{DOMAIN}")[0] == 250
        assert client.rcpt(f"anyone@{DOMAIN}")[0] == 550  # never local, never relayed
        client.rset()
        client.sendmail(sender, [rcpt], mail("encrypted", sender, rcpt))
    # the relay tried the domain's MX: the mail is queued for it or bounced to the sender
    wait_until(
        lambda: log_lines(relay, "mta delivery", f"to=<{rcpt}>") or queued(relay, rcpt),
        "an SMTP delivery attempt",
    )
    time.sleep(2)
    assert not [t for t in transport.transactions if rcpt in t[1]]
    for line in log_lines(relay, "mta delivery", f"to=<{rcpt}>"):
        assert not re.search(r'relay="127\.0\.0\.1', line), line


def test_turning_the_transport_off_leaves_its_queued_mail_to_smtp(relay, transport, render):
    """Last in this module: it restarts smtpd without the transport."""
    sender, rcpt = new_address("offswitch"), f"stuck@{os.urandom(4).hex()}.invalid"
    transport.pause()
    with login(relay, sender) as client:
        client.sendmail(sender, [rcpt], mail("encrypted", sender, rcpt))
    wait_until(lambda: log_lines(relay, "mda delivery", f"to=<{rcpt}>", "TempFail"),
               "a temporary failure")  # fmt: skip
    pillar = json.loads(json.dumps(relay["pillar"]))
    pillar["chatmail"]["daemons"] = {"mxtransport": False}
    rendered = render("debian13", "opensmtpd-off", pillar=pillar, grains=PLATFORMS["debian13"])
    conf = rendered.text("/etc/smtpd.conf")
    assert "smtp_channel" not in conf
    (relay["root"] / "etc/smtpd.conf").write_text(conf)
    chroot(relay["root"], "smtpd", "-n", "-f", "/etc/smtpd.conf")
    run_smtpd(relay)
    assert not log_lines(relay, "unknown dispatcher")
    assert queued(relay, rcpt)  # still there, and now for smtpd's SMTP relay
    smtpctl(relay, "schedule", "all")
    # the SMTP relay's MX lookup: the domain does not exist, so it bounces to the sender
    wait_until(lambda: log_lines(relay, "mta delivery", f"to=<{rcpt}>"), "an SMTP attempt")
    bounce = relay["sink"].wait_for(sender)
    assert rcpt.encode() in bounce
    assert not transport.accepted(rcpt)
