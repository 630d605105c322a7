"""filtermail: the SMTP filters Postfix passes every message through (``smtpd_proxy_filter``).

``filtermail INI outgoing`` sits behind submission: it rate-limits each sender, insists
that ``From:`` is the authenticated envelope sender and lets only OpenPGP-encrypted mail
(plus Secure-Join requests and self-sent Autocrypt Setup Messages) through.
``filtermail INI incoming`` sits behind port 25: it refuses cleartext for accounts that
ask for it (``enforceE2EEincoming``) and requires a DKIM signature aligned with ``From:``.
Accepted mail is handed back to Postfix by SMTP unchanged, and Postfix's reply is ours.
Reply texts and log lines follow upstream's filtermail, which clients and monitoring read.

The rules themselves are :class:`chatmaild.policy.MessagePolicy`, free of any transport:
OpenSMTPD applies the very same rules as an smtpd filter (:mod:`chatmaild.smtpdfilter`).
This module is only the aiosmtpd transport.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import dns.exception
from aiosmtpd.smtp import SMTP, Envelope, Session, syntax

from .config import EXIT_CONFIG, Config, config_for_main
from .policy import MODES, TOO_BIG, MessagePolicy, skip_dkim_requested
from .smtpclient import LOCAL_ERROR, Recipient, Reinjector

log = logging.getLogger("filtermail")

# End of DATA: "." alone on a line. readuntil() on ".\r\n" never reads past the message
# (a pipelining client may already have sent the next command); each hit is a terminator
# only if it starts a line.
DATA_END = b".\r\n"
_DOT_STUFFED = re.compile(rb"(?:(?<=\r\n)|\A)\.")

# SMTP parameters aiosmtpd does not know (it would answer 555); taken off the command
# line before aiosmtpd parses it. DSN ones are passed on at reinjection, AUTH is dropped.
MAIL_PARAMS = frozenset({"RET", "ENVID", "AUTH"})
RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})
PASSED_MAIL_OPTIONS = frozenset({"BODY", "SMTPUTF8"})
# RFC 5321 allows 512 bytes; DSN parameters (RFC 3461 §5) and SMTPUTF8 need more.
COMMAND_SIZE_LIMIT = 2048


def split_params(arg: str | None, known: frozenset[str]) -> tuple[str | None, dict[str, str]]:
    """Take trailing ``KEY=value`` parameters in ``known`` off an SMTP command argument.

    Parameters never contain spaces, so they are peeled off from the right until a word
    is not one of ours; what remains goes to aiosmtpd unchanged.
    """
    if not arg:
        return arg, {}
    words = arg.split()
    taken: dict[str, str] = {}
    while len(words) > 1:
        key, _, value = words[-1].partition("=")
        if key.upper() not in known:
            break
        taken[key.upper()] = value
        words.pop()
    return " ".join(words), dict(reversed(taken.items()))


async def read_data(
    reader: asyncio.StreamReader, limit: int, progress: Callable[[], None] = lambda: None
) -> bytearray | bytes | None:
    """The message after DATA's 354, dot-unstuffed; None if it exceeded ``limit`` bytes.

    Reads in large chunks instead of line by line (the bulk of filtermail's work is
    receiving mail) into one growing buffer, which is returned as it is: the message is
    held once, not as chunks plus a joined copy. Oversized data is read to its end and
    discarded, so the session stays in sync. ``progress`` is called per chunk (a slow
    upload is not an idle connection).
    """
    data = bytearray()
    size = 0
    tail = b"\r\n"  # the last two bytes read; the data starts at the beginning of a line
    while True:
        try:
            chunk = await reader.readuntil(DATA_END)
            found = True
        except asyncio.LimitOverrunError as exc:
            chunk = await reader.read(exc.consumed)
            found = False
        last = tail + chunk[-5:]
        if found and last[-5:-3] == b"\r\n":
            chunk = chunk[:-3]
        else:
            found = False  # "text.\r\n": a line that merely ends with a dot
        tail = last[-2:]
        progress()
        size += len(chunk)
        if size <= limit:
            data += chunk
        elif data:
            data = bytearray()
        if found:
            break
    if size > limit:
        return None
    if data.startswith(b".") or b"\n." in data:
        data = _DOT_STUFFED.sub(b"", data)
    return data


class FilterSMTP(SMTP):
    """aiosmtpd's server with DSN parameters, a fast DATA reader and upstream's replies."""

    # Also the stream buffer size: large chunks make receiving mail cheap.
    line_length_limit = 1 << 16

    def __init__(self, handler: FilterHandler, max_message_size: int):
        super().__init__(
            handler,
            data_size_limit=max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname="filtermail",
            ident="SMTP",
        )
        self.command_size_limits = collections.defaultdict(lambda: COMMAND_SIZE_LIMIT)
        self.command_size_limit = COMMAND_SIZE_LIMIT
        self.extra_params: dict[str, str] = {}

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            # Addresses came in with surrogateescape: never let encoding kill the session.
            status = status.encode("utf-8", "replace")
        await super().push(status)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        """Like aiosmtpd's DATA, but reading the message in bulk (see ``read_data``).

        aiosmtpd has no public accessor for its stream reader (``_reader``) and idle timer
        (``_reset_timeout``); both are used as aiosmtpd's own DATA uses them.
        """
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            data = await read_data(self._reader, self.data_size_limit, self._reset_timeout)
        except asyncio.IncompleteReadError:
            log.info("connection lost during DATA")
            self.transport.close()
            return
        envelope, self.envelope = self.envelope, Envelope()
        if data is None:
            await self.push(TOO_BIG)
            return
        envelope.content = envelope.original_content = data
        await self.push(await self.event_handler.handle_DATA(self, self.session, envelope))

    async def smtp_MAIL(self, arg: str | None) -> None:
        arg, self.extra_params = split_params(arg, MAIL_PARAMS | {"SIZE"})
        size = self.extra_params.pop("SIZE", None)
        if size is not None:
            if not (size.isascii() and size.isdigit()):  # "²".isdigit() is True
                await self.push("501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]")
                return
            if int(size) > self.data_size_limit:
                await self.push(TOO_BIG)
                return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        arg, self.extra_params = split_params(arg, RCPT_PARAMS)
        await super().smtp_RCPT(arg)


class FilterHandler:
    """aiosmtpd handler hooks for one mode."""

    def __init__(self, config: Config, mode: str, skip_dkim: bool = False):
        self.config = config
        self.mode = mode
        self.outgoing = mode == "outgoing"
        self.policy = MessagePolicy(config, mode, skip_dkim=skip_dkim)
        self.counters = self.policy.counters
        self.dkim = self.policy.dkim
        port = (
            config.postfix_reinject_port if self.outgoing else config.postfix_reinject_port_incoming
        )
        self.reinjector = Reinjector(config.postfix_host, port, helo=config.mail_domain)

    def close(self) -> None:
        self.reinjector.close()

    async def handle_EHLO(
        self,
        server: FilterSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return responses[:-1] + ["250-DSN", responses[-1]]

    async def handle_MAIL(
        self,
        server: FilterSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        refusal = self.policy.check_sender(address)
        if refusal is not None:
            return refusal
        params = {}
        for option in mail_options:
            key, _, value = option.partition("=")
            if key in PASSED_MAIL_OPTIONS:
                params[key] = value
        params.update((k, v) for k, v in server.extra_params.items() if k != "AUTH")
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.reinject_params = params
        envelope.recipients = []
        return "250 OK"

    async def handle_RCPT(
        self,
        server: FilterSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        refusal = self.policy.check_recipient(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.recipients.append(Recipient(address, dict(server.extra_params)))
        return "250 OK"

    async def handle_DATA(self, server: FilterSMTP, session: Session, envelope: Envelope) -> str:
        try:
            verdict = await self.policy.check(
                envelope.mail_from, envelope.rcpt_tos, envelope.original_content
            )
            reply = verdict.reply
            if reply is None:
                reply = await self.reinjector.send(
                    verdict.mail_from,
                    envelope.recipients,
                    envelope.original_content if verdict.content is None else verdict.content,
                    envelope.reinject_params,
                )
        except Exception:
            log.exception("filtering failed")
            return LOCAL_ERROR
        self.policy.count(verdict.encrypted, accepted=reply[:1] == "2")
        return reply


async def start_server(
    config: Config, mode: str, port: int | None = None, skip_dkim: bool = False
) -> tuple[asyncio.Server, FilterHandler]:
    """Listen on the mode's port (or ``port``, 0 for an ephemeral one in tests)."""
    handler = FilterHandler(config, mode, skip_dkim=skip_dkim)
    if port is None:
        port = (
            config.filtermail_smtp_port
            if mode == "outgoing"
            else config.filtermail_smtp_port_incoming
        )
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: FilterSMTP(handler, config.max_message_size),
        host=config.filtermail_host,
        port=port,
        reuse_address=True,
    )
    return server, handler


async def serve(config: Config, mode: str, skip_dkim: bool) -> int:
    try:
        server, handler = await start_server(config, mode, skip_dkim=skip_dkim)
    except (OSError, ValueError, dns.exception.DNSException) as exc:
        # Port in use, a bad dns_resolver, no /etc/resolv.conf: say so in one line.
        log.error("cannot start the %s filter: %s", mode, exc)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    host, port = server.sockets[0].getsockname()[:2]
    log.info("%s filter on %s:%d, entering serving loop", mode, host, port)
    try:
        await stop.wait()
    finally:
        server.close()
        handler.close()
        handler.counters.flush()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="filtermail", description=__doc__.split("\n")[0])
    parser.add_argument("ini", type=Path, help="path to chatmail.ini")
    parser.add_argument("mode", choices=MODES)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command
    config = config_for_main(args.ini)
    if config is None:
        return EXIT_CONFIG
    return asyncio.run(serve(config, args.mode, skip_dkim_requested(args.mode)))


if __name__ == "__main__":
    sys.exit(main())
