"""Helpers for the filtermail tests and benchmark: real servers on loopback, mail factories.

``LoopThread`` runs an asyncio loop in a background thread; ``Sink`` is a real aiosmtpd
server on an ephemeral port that records every envelope it gets (the reinjection target,
standing in for Postfix); ``start_filtermail`` runs the real filter on an ephemeral port in
such a loop. Tests talk to it with smtplib like Postfix's proxy client would.
"""

from __future__ import annotations

import asyncio
import base64
import os
import smtplib
import threading
from dataclasses import dataclass
from pathlib import Path

from aiosmtpd.smtp import SMTP

from chatmaild.config import Config
from chatmaild.filtermail import start_server

MAIL_DATA = Path(__file__).parent / "mail-data"


def load_mail(name: str, from_addr: str, to_addr: str, subject: str = "test") -> bytes:
    """A mail from ``mail-data/<name>.eml`` with CRLF line ends, as a client sends it."""
    text = (MAIL_DATA / f"{name}.eml").read_text()
    text = text.format(from_addr=from_addr, to_addr=to_addr, subject=subject)
    return text.replace("\n", "\r\n").encode()


def encrypted_payload(size: int) -> bytes:
    """A structurally valid OpenPGP message: one PKESK, one SEIPD of ``size`` random bytes."""
    pkesk_body = b"\x03" + os.urandom(8) + b"\x01" + os.urandom(258)
    pkesk = bytes([0xC1, 192 + ((len(pkesk_body) - 192) >> 8), (len(pkesk_body) - 192) & 0xFF])
    seipd_body = b"\x01" + os.urandom(size)
    seipd = b"\xd2\xff" + len(seipd_body).to_bytes(4, "big")
    return pkesk + pkesk_body + seipd + seipd_body


def armor(data: bytes) -> str:
    b64 = base64.b64encode(data).decode()
    lines = [b64[i : i + 76] for i in range(0, len(b64), 76)]
    return (
        "-----BEGIN PGP MESSAGE-----\r\n\r\n"
        + "\r\n".join(lines)
        + "\r\n-----END PGP MESSAGE-----\r\n"
    )


def encrypted_mail(from_addr: str, to_addr: str, size: int = 20_000, subject: str = "...") -> bytes:
    """An OpenPGP/MIME mail of about ``size`` bytes, shaped like Delta Chat's."""
    payload = armor(encrypted_payload(max(0, size * 3 // 4 - 600)))
    return (
        f"From: <{from_addr}>\r\nTo: <{to_addr}>\r\nSubject: {subject}\r\n"
        "Date: Fri, 27 Nov 2026 08:00:00 +0000\r\nMessage-ID: <x1@example.org>\r\n"
        "Chat-Version: 1.0\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n'
        ' boundary="Xb8nFq2Wt0"\r\n\r\n'
        "--Xb8nFq2Wt0\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
        '--Xb8nFq2Wt0\r\nContent-Type: application/octet-stream; name="encrypted.asc"\r\n\r\n'
        f"{payload}\r\n--Xb8nFq2Wt0--\r\n"
    ).encode()


class LoopThread:
    """An asyncio event loop in a daemon thread; ``run(coro)`` waits for the result."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    content: bytes


class Sink:
    """A recording SMTP server: the stand-in for Postfix's reinjection port."""

    def __init__(self, loop_thread: LoopThread, reply: str = "250 2.0.0 Ok: queued as 4ABCDEF"):
        self.loop_thread = loop_thread
        self.reply = reply
        self.received: list[Received] = []
        self.server = loop_thread.run(self._start())
        self.port = self.server.sockets[0].getsockname()[1]

    def make_protocol(self) -> SMTP:
        return SMTP(self, hostname="sink", enable_SMTPUTF8=True)

    async def _start(self):
        return await asyncio.get_running_loop().create_server(self.make_protocol, "127.0.0.1", 0)

    async def handle_DATA(self, server, session, envelope) -> str:
        if self.reply.startswith("2"):
            self.received.append(
                Received(
                    envelope.mail_from,
                    list(envelope.rcpt_tos),
                    list(envelope.mail_options),
                    envelope.original_content,
                )
            )
        return self.reply

    def stop(self) -> None:
        async def close():
            self.server.close()

        self.loop_thread.run(close())


class Filtermail:
    """The real filter, listening on an ephemeral port in a ``LoopThread``."""

    def __init__(self, loop_thread: LoopThread, config: Config, mode: str, skip_dkim: bool = False):
        self.loop_thread = loop_thread
        self.server, self.handler = loop_thread.run(
            start_server(config, mode, port=0, skip_dkim=skip_dkim)
        )
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def close():
            self.server.close()
            self.handler.close()

        self.loop_thread.run(close())


def send(
    port: int, mail_from: str, rcpts: list[str], data: bytes, mail_options=(), rcpt_options=()
):
    """One SMTP transaction; returns (code, text) of the first non-2xx reply or of DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("postfix.local")
        code, text = client.mail(mail_from, list(mail_options))
        if code != 250:
            return code, text.decode()
        for rcpt in rcpts:
            code, text = client.rcpt(rcpt, list(rcpt_options))
            if code != 250:
                return code, text.decode()
        code, text = client.data(data)
        return code, text.decode()
