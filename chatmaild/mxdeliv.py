"""chatmail-mxdeliv: other relays deliver to us over HTTPS, ``POST /mxdeliv``.

The wire format is upstream's (chatmail/filtermail, which took it from Madmail; see
README.md, "Relay-to-relay delivery over HTTPS"): the body is the raw RFC 5322 message,
``X-Mail-From`` the envelope sender, one ``X-Mail-To`` per recipient. nginx terminates
TLS on 443, bounds the body size and slow clients, and passes ``/mxdeliv`` to this
listener on loopback (``filtermail_http_port_incoming``).

A message gets exactly the checks of port 25 (:class:`chatmaild.policy.MessagePolicy` in
incoming mode: DKIM aligned with ``From:``, encryption for accounts that want it, size)
plus two that Postfix and OpenSMTPD make on port 25 before the filter sees the message:
every recipient must be an address of this relay, and an account that exists. Accepted
mail is reinjected like port 25 mail (``postfix_reinject_port_incoming``; OpenSMTPD has a
loopback listener on that port). ``200`` means accepted for every recipient; a refusal
is an HTTP error whose body is the SMTP reply, e.g. ``403`` with ``523 Encryption
Needed: Invalid Unencrypted Mail``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import dns.exception

from .config import EXIT_CONFIG, Config, config_for_main
from .counters import Counters
from .policy import TOO_BIG, MessagePolicy, skip_dkim_requested
from .smtpclient import LOCAL_ERROR, Recipient, Reinjector
from .user import InvalidAddress, User

log = logging.getLogger("mxdeliv")

PATH = "/mxdeliv"
MAX_HEAD = 64 << 10  # request line and headers (nginx allows 4 x 8 KiB)
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 120.0  # nginx buffers the body first: this is loopback speed
MAX_RECIPIENTS = 100
# messages read and checked at once: memory stays a few times max_message_size each
MAX_CONCURRENT = 16
_BARE_LF = re.compile(rb"(?<!\r)\n")
_ADDRESS = re.compile(r"[^\s<>,]+@[^\s<>,]+")


class BadRequest(ValueError):
    """A request that is no delivery: answered 4xx with an SMTP-style reply."""

    def __init__(self, status: int, reply: str):
        super().__init__(reply)
        self.status = status
        self.reply = reply


@dataclass(frozen=True)
class Delivery:
    mail_from: str
    rcpt_tos: list[str]
    length: int


def http_status(reply: str) -> int:
    """The HTTP status carrying SMTP ``reply``: 200 for 2xx, 503 for a temporary refusal
    (the sender retries), else a 4xx that says what was refused."""
    code = reply[:3]
    if code.startswith("2"):
        return 200
    if code.startswith("4"):
        return 503
    if code == "552":
        return 413
    if "User unknown" in reply or "Relay access denied" in reply:
        return 404
    return 403


def parse_head(head: bytes) -> Delivery:
    """The delivery a request's head (request line and headers, no final blank line) asks for."""
    try:
        lines = head.decode("utf-8").split("\r\n")
    except UnicodeDecodeError:
        raise BadRequest(400, "500 Request head is not UTF-8") from None
    method, _, rest = lines[0].partition(" ")
    target = rest.rpartition(" ")[0]
    if method != "POST":
        raise BadRequest(405, f"500 HTTP method {method[:20]!r} not allowed")
    if target.split("?", 1)[0].rstrip("/") != PATH:
        raise BadRequest(404, "500 Not found")
    mail_from, rcpt_tos, length = None, [], None
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon:
            raise BadRequest(400, "500 Malformed header line")
        name, value = name.strip().lower(), value.strip()
        if name == "x-mail-from":
            mail_from = value.strip("<>")
        elif name == "x-mail-to":
            # proxies may fold repeated headers into one, comma-separated
            rcpt_tos.extend(a.strip("<>") for a in _ADDRESS.findall(value))
        elif name == "content-length":
            if not (value.isascii() and value.isdigit()):
                raise BadRequest(400, "500 Invalid Content-Length")
            length = int(value)
        elif name == "transfer-encoding":
            raise BadRequest(411, "500 Content-Length required")
    if length is None:
        raise BadRequest(411, "500 Content-Length required")
    if mail_from is None or "\n" in mail_from or " " in mail_from:
        raise BadRequest(400, "500 Missing or invalid X-Mail-From")
    if not rcpt_tos:
        raise BadRequest(400, "500 Missing X-Mail-To")
    if len(rcpt_tos) > MAX_RECIPIENTS:
        raise BadRequest(400, "452 Too many recipients")
    return Delivery(mail_from, rcpt_tos, length)


class MxdelivServer:
    """The ``/mxdeliv`` listener: one request per connection (nginx opens one per POST)."""

    def __init__(self, config: Config, skip_dkim: bool = False):
        self.config = config
        self.counters = Counters(config.counters_dir, "mxdeliv")
        self.policy = MessagePolicy(config, "incoming", skip_dkim=skip_dkim, counters=self.counters)
        self.reinjector = Reinjector(
            config.postfix_host, config.postfix_reinject_port_incoming, helo=config.mail_domain
        )
        self.domain = config.address_domain.lower()
        self.slots = asyncio.Semaphore(MAX_CONCURRENT)

    def close(self) -> None:
        self.reinjector.close()
        self.counters.flush()

    def recipient_refusal(self, rcpt: str) -> str | None:
        """Port 25's recipient checks: our domain, an existing account (user+tag: user)."""
        local, _, domain = rcpt.lower().rpartition("@")
        if domain != self.domain or not local:
            return f"554 5.7.1 <{rcpt}>: Relay access denied"
        try:
            user = User(self.config.mailboxes_path, f"{local.split('+', 1)[0]}@{domain}")
        except InvalidAddress:
            return f"550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown"
        if not user.password_path.exists():
            return f"550 5.1.1 <{rcpt}>: Recipient address rejected: User unknown"
        return None

    async def deliver(self, delivery: Delivery, data: bytes | bytearray) -> str:
        """The SMTP reply for one message: a refusal, or the MTA's reply to reinjection."""
        for rcpt in delivery.rcpt_tos:
            refusal = self.recipient_refusal(rcpt)
            if refusal is not None:
                return refusal
        if b"\n" in data and _BARE_LF.search(data):
            data = _BARE_LF.sub(b"\r\n", data)  # SMTP's line ends, as Postfix would make them
        verdict = await self.policy.check(delivery.mail_from, delivery.rcpt_tos, data)
        reply = verdict.reply
        if reply is None:
            reply = await self.reinjector.send(
                verdict.mail_from,
                [Recipient(r) for r in delivery.rcpt_tos],
                data if verdict.content is None else verdict.content,
            )
        self.policy.count(verdict.encrypted, accepted=reply[:1] == "2")
        return reply

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = "?"
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            delivery = parse_head(head[:-4])
            if delivery.length > self.config.max_message_size:
                raise BadRequest(413, TOO_BIG)
            client = _header(head, b"x-real-ip") or client
            async with self.slots:
                async with asyncio.timeout(BODY_TIMEOUT_S):
                    data = await reader.readexactly(delivery.length)
                try:
                    reply = await self.deliver(delivery, data)
                except Exception:
                    log.exception("delivery over /mxdeliv failed")
                    reply = LOCAL_ERROR
                del data
            status = http_status(reply)
            result = "accepted" if status == 200 else "refused"
            self.counters.inc("mxdeliv_received_total", result=result)
            log.info(
                "channel=https from=<%s> to=<%s> client=%s status=%d reply=%s",
                delivery.mail_from,
                ">,<".join(delivery.rcpt_tos),
                client,
                status,
                reply.splitlines()[0],
            )
            await _respond(writer, status, reply)
        except BadRequest as exc:
            self.counters.inc("mxdeliv_received_total", result="bad_request")
            log.info("bad /mxdeliv request from %s: %d %s", client, exc.status, exc.reply)
            await _respond(writer, exc.status, exc.reply)
        except asyncio.LimitOverrunError:
            await _respond(writer, 431, "500 Request head too large")
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            log.info("/mxdeliv request dropped: %s", type(exc).__name__)
        finally:
            writer.close()


def _header(head: bytes, name: bytes) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip().decode("ascii", "replace")[:64]
    return None


async def _respond(writer: asyncio.StreamWriter, status: int, reply: str) -> None:
    body = (reply.rstrip("\r\n") + "\r\n").encode("utf-8", "replace")
    writer.write(
        f"HTTP/1.1 {status} {'OK' if status == 200 else 'Refused'}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    try:
        await writer.drain()
    except ConnectionError:
        pass


async def start_server(
    config: Config, port: int | None = None, skip_dkim: bool = False
) -> tuple[asyncio.Server, MxdelivServer]:
    """Listen on ``filtermail_http_port_incoming`` (or ``port``, 0: ephemeral, in tests)."""
    handler = MxdelivServer(config, skip_dkim=skip_dkim)
    server = await asyncio.start_server(
        handler.handle,
        host=config.filtermail_host,
        port=config.filtermail_http_port_incoming if port is None else port,
        limit=MAX_HEAD,
        reuse_address=True,
    )
    return server, handler


async def serve(config: Config, skip_dkim: bool) -> int:
    try:
        server, handler = await start_server(config, skip_dkim=skip_dkim)
    except (OSError, ValueError, dns.exception.DNSException) as exc:
        log.error("cannot start the /mxdeliv listener: %s", exc)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    host, port = server.sockets[0].getsockname()[:2]
    log.info("/mxdeliv listener on %s:%d for %s", host, port, config.address_domain)
    try:
        await stop.wait()
    finally:
        server.close()
        handler.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatmail-mxdeliv", description=__doc__.split("\n")[0])
    parser.add_argument("ini", type=Path, help="path to chatmail.ini")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = config_for_main(args.ini)
    if config is None:
        return EXIT_CONFIG
    return asyncio.run(serve(config, skip_dkim_requested("incoming")))


if __name__ == "__main__":
    sys.exit(main())
