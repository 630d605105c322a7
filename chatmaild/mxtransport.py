"""chatmail-mxtransport: the MTA's transport to other domains, HTTPS first, then SMTP.

The MTA hands every message for another domain to this LMTP server on
``<filtermail_host>:<filtermail_lmtp_port_transport>``: Postfix as its ``default_transport``
(as upstream's filtermail-transport), OpenSMTPD through its LMTP delivery agent, one
recipient at a time (the ``Return-Path``/``Delivered-To`` lines that agent writes on top of
the message are cut off again). Per recipient domain it looks up the MX hosts (an IP
literal ``[192.0.2.1]`` is its own host, no MX: the domain itself) and POSTs the message
to ``https://<MX host>/mxdeliv`` in upstream's wire format (see :mod:`chatmaild.mxdeliv`).

- ``200``: delivered; the LMTP reply names the channel, so Postfix's log line does too.
- an HTTP 4xx whose body is an SMTP ``5xx`` reply (a relay like ours refusing the message):
  that refusal, and Postfix bounces with the receiver's own words. Under OpenSMTPD
  (``--mta opensmtpd``: its 7.6 delivery agent takes any LMTP error for a temporary one and
  would retry for days) the message goes to the SMTP channel instead, as upstream's
  transport does: the receiver refuses it on port 25 and smtpd bounces.
- anything else (no listener on 443, a web server without ``/mxdeliv``, a TLS failure, a
  timeout, a ``5xx``): the host is remembered for ``mxdeliv_retry_after`` seconds (upstream:
  30 minutes) and the message goes to the SMTP channel: the MTA's own SMTP client with its
  TLS policy, through its loopback listener on ``postfix_reinject_port_smtp`` (Postfix: a
  ``content_filter=smtp:`` to the recipient's domain; OpenSMTPD: a tag relayed over SMTP).
  The MTA queues it there until port 25 takes it; if that listener cannot take it either,
  the reply is ``4xx`` and the MTA keeps the message and retries both channels later:
  nothing is lost.

TLS is verified like Postfix's SMTP client verifies it (``smtp_tls_policy_map``): against
the MX host name with the system's CAs, except for IP literals and ``_`` domains, whose
relays have self-signed certificates.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import ssl
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.resolver
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import Envelope, Session

from .config import EXIT_CONFIG, Config, config_for_main
from .counters import Counters
from .dkimverify import parse_resolver_address
from .mailqueue import MTAS
from .smtpclient import LOCAL_ERROR, Recipient, Reinjector

log = logging.getLogger("mxtransport")

CONNECT_TIMEOUT_S = 10.0
MAX_RESPONSE = 64 << 10
WRITE_CHUNK = 1 << 18
_SMTP_REFUSAL = re.compile(r"5[0-9]{2}[ -]")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})")


@dataclass(frozen=True)
class Outcome:
    """What one POST achieved: ``accepted``, ``refused`` (permanently) or ``failed``."""

    result: str
    detail: str


def classify(status: int, body: bytes) -> Outcome:
    """The outcome of an HTTP answer to ``POST /mxdeliv``."""
    text = body.decode("utf-8", "replace").strip()
    first = text.splitlines()[0][:500] if text else ""
    if status == 200:
        return Outcome("accepted", first or "200")
    if 400 <= status < 500 and _SMTP_REFUSAL.match(first):
        return Outcome("refused", first)
    return Outcome("failed", f"HTTP {status} {first[:100]}".rstrip())


def needs_verified_tls(domain: str) -> bool:
    """Postfix's smtp_tls_policy_map: IP literals and _ domains have self-signed certificates."""
    return not domain.startswith(("[", "_"))


def request_head(host: str, mail_from: str, rcpt_tos: list[str], length: int) -> bytes:
    """The head of upstream's ``POST /mxdeliv`` (one ``X-Mail-To`` per recipient)."""
    for value in (mail_from, *rcpt_tos):
        if any(ord(c) < 0x21 or c in "<>," for c in value):
            raise ValueError(f"address unfit for an HTTP header: {value!r}")
    lines = [
        "POST /mxdeliv HTTP/1.1",
        f"Host: {host}",
        f"X-Mail-From: {mail_from}",
        *(f"X-Mail-To: {rcpt}" for rcpt in rcpt_tos),
        "Content-Type: application/octet-stream",
        f"Content-Length: {length}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def strip_agent_headers(data: bytes, mail_from: str, rcpt: str) -> bytes:
    """The message without what smtpd's LMTP delivery agent wrote on top of it (its mda.c):
    ``Return-Path: <sender>`` when there is a sender, then ``Delivered-To: <recipient>``.
    No part of the message, and an OpenSMTPD receiver would take its own recipient's
    ``Delivered-To`` for a mail loop."""
    head = f"Delivered-To: {rcpt}\r\n".encode()
    if mail_from:
        head = f"Return-Path: <{mail_from}>\r\n".encode() + head
    if data[: len(head)].lower() == head.lower():
        return data[len(head) :]
    return data


class Transport:
    def __init__(self, config: Config, https_port: int = 443, mta: str = "postfix"):
        self.config = config
        self.https_port = https_port
        #: smtpd's LMTP delivery agent talks to us: its headers come off the message, and a
        #: refusal goes to the SMTP channel (7.6 retries an LMTP 5xx, OpenSMTPD issue #1276)
        self.smtpd_agent = mta == "opensmtpd"
        self.retry_after = config.mxdeliv_retry_after
        self.counters = Counters(config.counters_dir, "mxtransport")
        self.smtp_channel = Reinjector(
            config.postfix_host, config.postfix_reinject_port_smtp, helo=config.mail_domain
        )
        server = parse_resolver_address(config.dns_resolver)
        if server is None:
            self.resolver = dns.asyncresolver.Resolver()
        else:
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            self.resolver.nameservers, self.resolver.port = [server[0]], server[1]
        self.resolver.lifetime = 10.0
        self.verified = ssl.create_default_context()
        self.unverified = ssl.create_default_context()
        self.unverified.check_hostname = False
        self.unverified.verify_mode = ssl.CERT_NONE
        for context in (self.verified, self.unverified):
            context.minimum_version = ssl.TLSVersion.TLSv1_2
        #: MX host -> monotonic time until which it is not asked over HTTPS
        self.no_https: dict[str, float] = {}

    def close(self) -> None:
        self.smtp_channel.close()
        self.counters.flush()

    async def mx_hosts(self, domain: str) -> list[str]:
        """Where ``domain``'s mail goes: its MX hosts by preference, or the domain itself."""
        if domain.startswith("["):
            return [domain[1:-1].removeprefix("IPv6:").removeprefix("ipv6:")]
        try:
            answer = await self.resolver.resolve(domain, "MX", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [domain]
        records = sorted(answer, key=lambda r: r.preference)
        return [str(r.exchange).rstrip(".") for r in records if str(r.exchange) != "."]

    async def post(self, host: str, domain: str, mail_from: str, rcpts: list[str], data) -> Outcome:
        verify = needs_verified_tls(domain)
        context = self.verified if verify else self.unverified
        try:
            head = request_head(host, mail_from, rcpts, len(data))
        except ValueError as exc:  # never an HTTP header: SMTP takes such addresses
            return Outcome("failed", str(exc))
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(
                    host,
                    self.https_port,
                    ssl=context,
                    server_hostname=host if verify else None,
                    limit=MAX_RESPONSE,
                )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            return Outcome("failed", f"connect: {exc or type(exc).__name__}")
        try:
            # as long as a slow SMTP peer may take: 60 s plus 1 s per 100 kB
            async with asyncio.timeout(60.0 + len(data) / 100_000):
                writer.write(head)
                view = memoryview(data)
                for start in range(0, len(view), WRITE_CHUNK):
                    writer.write(view[start : start + WRITE_CHUNK])
                    await writer.drain()
                response_head = await reader.readuntil(b"\r\n\r\n")
                match = _STATUS_LINE.match(response_head)
                if match is None:
                    return Outcome("failed", f"not HTTP: {response_head[:60]!r}")
                body = b""
                while len(body) < MAX_RESPONSE and (chunk := await reader.read(MAX_RESPONSE)):
                    body += chunk
                if b"transfer-encoding: chunked" in response_head.lower():
                    body = body.partition(b"\r\n")[2]  # the first chunk is all we read
        except (
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ) as exc:
            return Outcome("failed", f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()
        return classify(int(match.group(1)), body)

    async def deliver(self, mail_from: str, rcpts: list[str], data) -> list[str]:
        """One LMTP reply per recipient, in order."""
        by_domain: dict[str, list[str]] = defaultdict(list)
        for rcpt in rcpts:
            by_domain[rcpt.rpartition("@")[2].lower()].append(rcpt)
        replies: dict[str, str] = {}
        for domain, group in by_domain.items():
            reply = await self.deliver_domain(domain, mail_from, group, data)
            replies.update((rcpt, reply) for rcpt in group)
        return [replies[rcpt] for rcpt in rcpts]

    async def deliver_domain(self, domain: str, mail_from: str, rcpts: list[str], data) -> str:
        outcome = Outcome("failed", "no MX host")
        try:
            hosts = await self.mx_hosts(domain)
        except dns.exception.DNSException as exc:
            hosts, outcome = [], Outcome("failed", f"MX lookup: {type(exc).__name__}")
        now = time.monotonic()
        for host in hosts:
            if self.no_https.get(host, 0) > now:
                outcome = Outcome("failed", f"{host} remembered without /mxdeliv")
                break
            outcome = await self.post(host, domain, mail_from, rcpts, data)
            self._log("https", outcome.result, host, mail_from, rcpts, outcome.detail)
            self.counters.inc("outbound_deliveries_total", channel="https", result=outcome.result)
            if outcome.result == "accepted":
                return f"250 2.0.0 Ok: channel=https relay={host}"
            if outcome.result == "refused":
                if not self.smtpd_agent:
                    return outcome.detail
                break  # /mxdeliv works: the host is not left alone
            self.no_https[host] = now + self.retry_after
        reply = await self.smtp_channel.send(mail_from, [Recipient(r) for r in rcpts], data)
        result = {"2": "accepted", "4": "deferred"}.get(reply[:1], "refused")
        self._log("smtp", result, domain, mail_from, rcpts, f"{reply} (https: {outcome.detail})")
        self.counters.inc("outbound_deliveries_total", channel="smtp", result=result)
        if result == "accepted":
            return "250 2.0.0 Ok: channel=smtp " + reply.splitlines()[-1][4:]
        return reply

    @staticmethod
    def _log(channel, result, relay, mail_from, rcpts, detail) -> None:
        log.info(
            "channel=%s result=%s relay=%s from=<%s> to=<%s> %s",
            channel, result, relay, mail_from, ">,<".join(rcpts), detail,
        )  # fmt: skip


class TransportHandler:
    """aiosmtpd hooks: collect the envelope, answer DATA with one reply per recipient."""

    def __init__(self, transport: Transport):
        self.transport = transport

    async def handle_DATA(self, server: LMTP, session: Session, envelope: Envelope) -> str:
        mail_from = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
        data = envelope.original_content
        if self.transport.smtpd_agent and len(envelope.rcpt_tos) == 1:
            data = strip_agent_headers(data, mail_from, envelope.rcpt_tos[0])
        try:
            replies = await self.transport.deliver(mail_from, envelope.rcpt_tos, data)
        except Exception:
            log.exception("delivery failed")
            replies = [LOCAL_ERROR] * len(envelope.rcpt_tos)
        return "\r\n".join(replies)  # LMTP (RFC 2033 §4.2): one reply per recipient


async def start_server(
    config: Config, port: int | None = None, https_port: int = 443, mta: str = "postfix"
) -> tuple[asyncio.Server, Transport]:
    transport = Transport(config, https_port, mta)
    handler = TransportHandler(transport)
    server = await asyncio.get_running_loop().create_server(
        lambda: LMTP(
            handler,
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname="mxtransport",
        ),
        host=config.filtermail_host,
        port=config.filtermail_lmtp_port_transport if port is None else port,
        reuse_address=True,
    )
    return server, transport


async def serve(config: Config, mta: str) -> int:
    try:
        server, transport = await start_server(config, mta=mta)
    except (OSError, ValueError, dns.exception.DNSException) as exc:
        log.error("cannot start the transport: %s", exc)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    host, port = server.sockets[0].getsockname()[:2]
    log.info("LMTP transport on %s:%d, HTTPS first, SMTP channel on port %d",
             host, port, config.postfix_reinject_port_smtp)  # fmt: skip
    try:
        await stop.wait()
    finally:
        server.close()
        transport.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chatmail-mxtransport", description=__doc__.split("\n")[0]
    )
    parser.add_argument("ini", type=Path, help="path to chatmail.ini")
    parser.add_argument("--mta", choices=MTAS, default="postfix")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    config = config_for_main(args.ini)
    if config is None:
        return EXIT_CONFIG
    return asyncio.run(serve(config, args.mta))


if __name__ == "__main__":
    sys.exit(main())
