"""A small asyncio SMTP client that hands accepted mail back to Postfix (reinjection).

Connections are kept open and reused for the next message (after a completed transaction
no RSET is needed, so Postfix never counts junk commands); idle ones are closed after
``idle_timeout``. A reused connection that turns out to be dead before any message data
was sent is replaced once, so a Postfix restart costs no mail. Commands are pipelined when
the server offers PIPELINING. Extension parameters (BODY, SMTPUTF8, DSN's RET/ENVID/NOTIFY/
ORCPT) are passed on only if the server announces the extension.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

LOCAL_ERROR = "451 Local error"
_DOT_LINE = re.compile(rb"^\.", re.MULTILINE)
_REPLY_CODE = re.compile(r"[0-9]{3}(?:[ -]|$)")  # ASCII digits: "²".isdigit() is True
MAX_REPLY_LINES = 100
WRITE_CHUNK = 1 << 18


class SMTPProtocolError(OSError):
    """The server closed the connection or answered something that is not SMTP."""


@dataclass(frozen=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    def __str__(self) -> str:
        """The reply as one SMTP reply, possibly multi-line, to pass on to our client."""
        last = len(self.lines) - 1
        return "\r\n".join(
            f"{self.code}{'-' if i < last else ' '}{line}" for i, line in enumerate(self.lines)
        )


@dataclass
class Recipient:
    address: str
    params: dict[str, str] = field(default_factory=dict)  # e.g. NOTIFY, ORCPT


def dot_stuff(data: bytes | bytearray) -> bytes | bytearray:
    """Escape lines starting with '.' and make sure the data ends with CRLF.

    Lines are split at any LF here, not only CRLF: a next hop that accepts bare LF line
    ends must never see an unescaped "." line (SMTP smuggling). Returns ``data`` itself,
    uncopied, when nothing needs changing.
    """
    if data.startswith(b".") or b"\n." in data:
        data = _DOT_LINE.sub(b"..", data)
    if not data.endswith(b"\r\n"):
        data = data + b"\r\n"  # never extend the caller's bytearray in place
    return data


def _format_params(params: dict[str, str]) -> str:
    return "".join(f" {key}={value}" if value else f" {key}" for key, value in params.items())


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.extensions: dict[str, str] = {}
        self.uses = 0
        self.data_sent = False  # message data of the current transaction went out
        self.idle_handle: asyncio.TimerHandle | None = None

    @classmethod
    async def open(cls, host: str, port: int, helo: str) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 16)
        conn = cls(reader, writer)
        try:
            greeting = await conn.read_reply()
            if greeting.code != 220:
                raise SMTPProtocolError(f"greeting: {greeting}")
            ehlo = await conn.command(f"EHLO {helo}")
            if ehlo.code != 250:
                raise SMTPProtocolError(f"EHLO: {ehlo}")
        except BaseException:
            conn.close()
            raise
        for line in ehlo.lines[1:]:
            keyword, _, value = line.partition(" ")
            conn.extensions[keyword.upper()] = value
        return conn

    @property
    def alive(self) -> bool:
        return not (self.reader.at_eof() or self.writer.is_closing())

    def close(self) -> None:
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        self.writer.close()

    async def read_reply(self) -> Reply:
        code = None
        lines: list[str] = []
        while len(lines) < MAX_REPLY_LINES:
            try:
                raw = await self.reader.readline()
            except ValueError:  # asyncio's way of saying the line exceeds the stream limit
                raise SMTPProtocolError("reply line too long") from None
            if not raw.endswith(b"\n"):
                raise SMTPProtocolError("connection closed by the server")
            line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
            if not _REPLY_CODE.match(line):
                raise SMTPProtocolError(f"not an SMTP reply: {line[:100]!r}")
            if code is not None and int(line[:3]) != code:
                raise SMTPProtocolError("reply code changed within a multi-line reply")
            code = int(line[:3])
            lines.append(line[4:])
            if line[3:4] != "-":
                return Reply(code, tuple(lines))
        raise SMTPProtocolError("reply too long")

    async def command(self, line: str) -> Reply:
        self.writer.write(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return await self.read_reply()

    def envelope_commands(
        self,
        mail_from: str,
        mail_params: dict[str, str],
        recipients: Iterable[Recipient],
        size: int,
    ) -> list[str]:
        ext = self.extensions
        params = {"SIZE": str(size)} if "SIZE" in ext else {}
        for key, extension in (
            ("BODY", "8BITMIME"),
            ("SMTPUTF8", "SMTPUTF8"),
            ("RET", "DSN"),
            ("ENVID", "DSN"),
        ):
            if key in mail_params and extension in ext:
                params[key] = mail_params[key]
        commands = [f"MAIL FROM:<{mail_from}>{_format_params(params)}"]
        for rcpt in recipients:
            rcpt_params = rcpt.params if "DSN" in ext else {}
            commands.append(f"RCPT TO:<{rcpt.address}>{_format_params(rcpt_params)}")
        return commands


class Reinjector:
    """Deliver messages to one SMTP server over a small pool of reused connections."""

    def __init__(
        self,
        host: str,
        port: int,
        helo: str = "localhost",
        max_idle: int = 16,
        idle_timeout: float = 30.0,
        max_uses: int = 1000,
        timeout: float = 60.0,  # Postfix waits smtpd_proxy_timeout (100 s) for us
    ):
        self.host = host
        self.port = port
        self.helo = helo
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.max_uses = max_uses
        self.timeout = timeout
        self._idle: list[Connection] = []

    async def send(
        self,
        mail_from: str,
        recipients: list[Recipient],
        data: bytes | bytearray,
        mail_params: dict[str, str] | None = None,
    ) -> str:
        """Send one message; return the reply our own client should get."""
        mail_params = mail_params or {}
        stuffed = dot_stuff(data)
        for attempt in (1, 2):
            # The retry opens a new connection: the other pooled ones died with the first.
            conn, reused = self._checkout() if attempt == 1 else (None, False)
            try:
                async with asyncio.timeout(self.timeout):
                    if conn is None:
                        conn = await Connection.open(self.host, self.port, self.helo)
                    reply, data_sent = await self._transaction(
                        conn, mail_from, mail_params, recipients, stuffed, len(data)
                    )
            except (OSError, TimeoutError, UnicodeError) as exc:
                if conn is not None:
                    conn.close()
                # A pooled connection the server has closed meanwhile: try once more
                # with a new one. Never after a timeout (the server is just slow) or
                # once the data went out (the server may have taken the message).
                dead = reused and not isinstance(exc, TimeoutError) and not conn.data_sent
                if dead and attempt == 1:
                    continue
                log.error("reinjection to %s:%s failed: %s", self.host, self.port, exc)
                return LOCAL_ERROR
            if reply.ok and data_sent:
                self._checkin(conn)
            else:
                conn.close()
            return str(reply)
        return LOCAL_ERROR

    async def _transaction(
        self,
        conn: Connection,
        mail_from: str,
        mail_params: dict[str, str],
        recipients: list[Recipient],
        stuffed: bytes | bytearray,
        size: int,
    ) -> tuple[Reply, bool]:
        """Run MAIL/RCPT/DATA; return the deciding reply and whether the data went out."""
        conn.data_sent = False
        commands = conn.envelope_commands(mail_from, mail_params, recipients, size) + ["DATA"]
        if "PIPELINING" in conn.extensions:
            conn.writer.write(
                b"".join(c.encode("utf-8", "surrogateescape") + b"\r\n" for c in commands)
            )
            replies = [await conn.read_reply() for _ in commands]
        else:
            replies = []
            for command in commands:
                replies.append(await conn.command(command))
                if not replies[-1].ok:
                    break
        failed = next((r for r in replies[:-1] if not r.ok), None)
        data_reply = replies[-1]
        if failed is not None or data_reply.code != 354:
            # A 354 despite a refused recipient would deliver to the others only; the
            # caller closes the connection, which aborts the transaction.
            return failed or data_reply, False
        conn.data_sent = True
        if len(stuffed) <= WRITE_CHUNK:
            conn.writer.write(stuffed + b".\r\n")  # one send, not two
        else:
            # In slices, waiting for each to drain: the transport would otherwise keep a
            # copy of whatever the socket does not take at once.
            view = memoryview(stuffed)
            for start in range(0, len(view), WRITE_CHUNK):
                conn.writer.write(view[start : start + WRITE_CHUNK])
                await conn.writer.drain()
            conn.writer.write(b".\r\n")
        return await conn.read_reply(), True

    def _checkout(self) -> tuple[Connection | None, bool]:
        while self._idle:
            conn = self._idle.pop()
            if conn.idle_handle is not None:
                conn.idle_handle.cancel()
                conn.idle_handle = None
            if conn.alive:
                return conn, True
            conn.close()
        return None, False

    def _checkin(self, conn: Connection) -> None:
        conn.uses += 1
        if conn.uses >= self.max_uses or len(self._idle) >= self.max_idle or not conn.alive:
            conn.close()
            return
        conn.idle_handle = asyncio.get_running_loop().call_later(
            self.idle_timeout, self._expire_idle, conn
        )
        self._idle.append(conn)

    def _expire_idle(self, conn: Connection) -> None:
        conn.idle_handle = None
        if conn in self._idle:
            self._idle.remove(conn)
        conn.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
