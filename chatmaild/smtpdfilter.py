"""chatmail-smtpd-filter: filtermail's rules inside OpenSMTPD, as an smtpd-filters(7) filter.

OpenSMTPD has no before-queue proxy like Postfix's ``smtpd_proxy_filter``, but it hands a
filter every line of a message before it answers the final ``.``. So the refusals of
:mod:`chatmaild.policy` (``523 Encryption Needed``, DKIM failures, ``From:`` not the
sender) become the SMTP reply to the client, as with Postfix, instead of bounces.

smtpd starts the filter (``filter "chatmail-in" proc-exec "chatmail-smtpd-filter INI
incoming" user vmail group vmail``) and talks to it on stdin/stdout, one line per event,
many sessions interleaved::

    smtpd: config|smtpd-version|7.6.0-portable ... config|ready
    we:    register|report|smtp-in|tx-mail ... register|filter|smtp-in|commit, register|ready
    smtpd: report|0.7|<time>|smtp-in|tx-rcpt|<session>|<msgid>|ok|bob@example.org
    smtpd: filter|0.7|<time>|smtp-in|data-line|<session>|<token>|<line, dot-stuffed>
    we:    filter-dataline|<session>|<token>|<line>     (after the final ".", all of them)
    smtpd: filter|0.7|<time>|smtp-in|commit|<session>|<token>|
    we:    filter-result|<session>|<token>|proceed      (or reject|523 Encryption Needed...)

A transaction's lines are buffered as bytes in one buffer per message (at most
``max_message_size`` bytes, more is refused with filtermail's ``552``; all sessions
together at most :data:`MESSAGES_BUFFERED` such messages, more is refused for now with
``452``); at the final ``.`` :class:`chatmaild.policy.MessagePolicy` decides, the lines
go back to smtpd (outgoing: with the submission header cleanup, incoming: with the
final-delivery cleanup, both from ``defaults/header_cleanup.json`` as Postfix's maps)
and ``commit`` gets the verdict.

``outgoing`` (587/465) also registers ``mail-from`` (filtermail's sender checks and rate
limit) and ``auth``: smtpd passes the AUTH command's argument, which for ``AUTH PLAIN
<initial response>`` holds the password (smtpd 7.6, verified). An unknown address is then
created by doveauth's rules (:func:`chatmaild.accounts.get_or_create`) before smtpd looks
up its credentials, so the first login may be an SMTP one. The filter always answers
``proceed``: smtpd checks the password against the stored hash itself. ``AUTH LOGIN``
and ``AUTH PLAIN`` without an initial response carry no password (the filter sees only
the mechanism): such a first login fails as before.

``outgoing`` also throttles password guessing: it learns each session's client address
(``link-connect``) and counts failed logins (``link-auth`` reports ``fail``); an address
with ``smtpd_auth_failures_max`` of them within ``smtpd_auth_failures_window`` seconds
gets ``421`` and is disconnected at its next AUTH (:mod:`chatmaild.authfailures`).

One process per direction (two ``filter`` lines in smtpd.conf): smtpd tells a filter
nothing about the listener a session came in on, and the direction decides everything.

Usage: ``chatmail-smtpd-filter INI {incoming,outgoing}``. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from .accounts import get_or_create
from .authfailures import FailedLogins, client_key
from .config import EXIT_CONFIG, Config, config_for_main
from .policy import MODES, TOO_BIG, MessagePolicy, Verdict, load_header_cleanup, skip_dkim_requested
from .smtpclient import LOCAL_ERROR
from .smtpdfilterio import open_stdio, read_lines
from .smtpdfilterproto import (
    SUBSYSTEM,
    ConfigEntry,
    FilterProtocolError,
    FilterRequest,
    Report,
    clean_header_lines,
    format_dataline,
    format_result,
    message_dataline_chunks,
    parse_line,
    plain_credentials,
    registrations,
    split_report_params,
    stuff,
    unstuff,
)

log = logging.getLogger("smtpdfilter")

TOO_MANY_FAILED_LOGINS = "421 4.7.0 Too many failed logins, try again later"

# Data lines are encoded into a message's buffer this many at a time (cheaper per line
# than one by one, and a bound on the str objects a session holds).
PENDING_LINES = 256
# All sessions' message data together may fill this many messages of max_message_size;
# a message that would need more is refused with FILTER_FULL (the sender retries).
MESSAGES_BUFFERED = 8
FILTER_FULL = "452 4.3.1 Insufficient system storage, try again later"


@dataclass
class Session:
    """What the report stream told us about one SMTP session, and its transaction."""

    user: str | None = None
    client: str | None = None  # see authfailures.client_key
    mail_from: str | None = None
    rcpts: list[str] = field(default_factory=list)
    #: the message so far, unstuffed, CRLF line ends: one buffer, not an object per line
    data: bytearray = field(default_factory=bytearray)
    #: its last lines, not yet encoded into ``data`` (at most PENDING_LINES)
    pending: list[str] = field(default_factory=list)
    #: bytes of ``data`` plus characters (and line ends) of ``pending``
    size: int = 0
    #: the reply for a message that could not be buffered (too large, filter full)
    refusal: str | None = None
    verdict: asyncio.Future | None = None

    def reset(self) -> None:
        self.mail_from = None
        self.rcpts = []
        self.data = bytearray()
        self.pending, self.size = [], 0
        self.refusal = None
        self.verdict = None


async def _written() -> None:
    """``drain`` for a ``write`` that takes everything at once."""


class SmtpdFilter:
    """The protocol state machine for one direction; ``write`` sends a line to smtpd."""

    def __init__(
        self,
        config: Config,
        mode: str,
        write: Callable[[str], None],
        skip_dkim: bool = False,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.config = config
        self.mode = mode
        self.outgoing = mode == "outgoing"
        self.write = write
        #: waits until smtpd has read most of what was written (run() sets the real one)
        self.drain: Callable[[], Awaitable[None]] = _written
        self.policy = MessagePolicy(config, mode, skip_dkim=skip_dkim)
        self.cleanup = load_header_cleanup()["submission" if self.outgoing else "delivery"]
        #: bytes of message data held, all sessions together, and the most allowed
        self.buffered = 0
        self.max_message_size = config.max_message_size
        self.max_buffered = config.max_message_size * MESSAGES_BUFFERED
        self.smtpd_config: dict[str, str] = {}
        self.registered = False
        self.sessions: dict[str, Session] = {}
        self.failed_logins = FailedLogins(
            config.smtpd_auth_failures_max, config.smtpd_auth_failures_window
        )
        self.tasks: set[asyncio.Task] = set()

    def close(self) -> None:
        self.policy.counters.flush()

    def handle_line(self, line: str) -> None:
        """Act on one line; never raises for bad input (it is logged and dropped)."""
        try:
            event = parse_line(line)
        except FilterProtocolError as exc:
            log.warning("ignoring line from smtpd: %s", exc)
            return
        if isinstance(event, ConfigEntry):
            self._config(event)
        elif isinstance(event, Report):
            self._report(event)
        else:
            self._filter(event)

    def _config(self, entry: ConfigEntry) -> None:
        if entry.key != "ready":
            self.smtpd_config[entry.key] = entry.value or ""
            return
        if self.registered:
            log.warning("ignoring a second config|ready")
            return
        self.registered = True
        for line in registrations(self.mode):
            self.write(line + "\n")
        log.info(
            "%s filter for smtpd %s (protocol %s)",
            self.mode,
            self.smtpd_config.get("smtpd-version", "?"),
            self.smtpd_config.get("protocol", "?"),
        )

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- report stream: our copy of smtpd's session state --------------------------------

    def _report(self, report: Report) -> None:
        if report.subsystem != SUBSYSTEM:
            return
        if report.event == "link-disconnect":
            session = self.sessions.pop(report.session, None)
            if session is not None:
                self._release(session)
                if session.verdict is not None:
                    session.verdict.cancel()
            return
        session = self.sessions.setdefault(report.session, Session())
        params = split_report_params(report.event, report.params)
        if report.event == "link-connect" and len(params) == 4:
            session.client = client_key(params[2])
        elif report.event == "link-auth" and len(params) == 2:
            result, user = params
            session.user = user if result == "pass" else None
            if result == "fail" and session.client is not None:
                self.failed_logins.failed(session.client)
        elif report.event in ("tx-begin", "tx-reset"):
            self._release(session)
            session.reset()
        elif report.event == "tx-mail" and len(params) == 3 and params[1] == "ok":
            session.mail_from = params[2]
        elif report.event == "tx-rcpt" and len(params) == 3 and params[1] == "ok":
            session.rcpts.append(params[2])

    # -- filter stream: decisions ------------------------------------------------------

    def _filter(self, request: FilterRequest) -> None:
        session = self.sessions.setdefault(request.session, Session())
        phase = request.phase
        if phase == "data-line":
            self._data_line(session, request)
        elif phase == "commit":
            self._spawn(self._commit(session, request))
        elif phase == "mail-from":
            reply = self.policy.check_sender(request.params)
            self.write(format_result(request.session, request.token, reply))
        elif phase == "rcpt-to":
            reply = self.policy.check_recipient(request.params)
            self.write(format_result(request.session, request.token, reply))
        elif phase == "connect" and self.outgoing:
            # "<rdns>|<address>": refused here, a client sends no credentials at all
            session.client = client_key(request.params.rpartition("|")[2])
            self._throttle(session, request, "connection")
        elif phase == "auth" and self.outgoing:
            # For sessions that were open before the address was blocked. smtpd logs the
            # command a filter refuses as it came, AUTH PLAIN's credentials included: the
            # connect phase above keeps that to the guesser's own sessions.
            if not self._throttle(session, request, "AUTH"):
                self._spawn(self._auth(request))
        else:
            self.write(format_result(request.session, request.token, None))

    def _throttle(self, session: Session, request: FilterRequest, what: str) -> bool:
        """Whether the session's address failed too many logins; then it is disconnected
        (answered here), else the caller answers the request."""
        if session.client is None or not self.failed_logins.blocked(session.client):
            if what == "connection":
                self.write(format_result(request.session, request.token, None))
            return False
        log.warning("refusing %s from %s: too many failed logins", what, session.client)
        self.write(format_result(request.session, request.token, TOO_MANY_FAILED_LOGINS,
                                 disconnect=True))  # fmt: skip
        return True

    def _data_line(self, session: Session, request: FilterRequest) -> None:
        line = request.params
        if line == ".":
            session.verdict = self._spawn(self._decide(session, request))
            return
        if session.refusal is not None:
            return
        line = unstuff(line)
        size = len(line) + 2  # characters; bytes are counted when the lines are encoded
        session.size += size
        self.buffered += size
        # smtpd enforces the byte limit itself too (`smtp max-message-size`, same value)
        if session.size > self.max_message_size:
            self._too_big(session)
        elif self.buffered > self.max_buffered:
            log.warning("refusing a message: %d bytes of mail buffered already", self.buffered)
            self._refuse(session, FILTER_FULL)
        else:
            session.pending.append(line)
            if len(session.pending) >= PENDING_LINES:
                self._flush(session)

    def _flush(self, session: Session) -> None:
        """Encode the pending lines into the message buffer, all at once."""
        if not session.pending:
            return
        text = "\r\n".join(session.pending) + "\r\n"
        chunk = text.encode("utf-8", "surrogateescape")
        session.pending = []
        session.data += chunk
        session.size += len(chunk) - len(text)
        self.buffered += len(chunk) - len(text)
        if session.size > self.max_message_size:
            self._too_big(session)

    def _too_big(self, session: Session) -> None:
        log.info("message exceeds max_message_size %d", self.max_message_size)
        self._refuse(session, TOO_BIG)

    def _release(self, session: Session) -> None:
        self.buffered -= session.size
        session.data, session.pending, session.size = bytearray(), [], 0

    def _refuse(self, session: Session, reply: str) -> None:
        self._release(session)
        session.refusal = reply

    async def _decide(self, session: Session, request: FilterRequest) -> str | None:
        """Judge the buffered message, give its lines back to smtpd; the commit reply."""
        self._flush(session)
        data, size = session.data, session.size
        session.data, session.size = bytearray(), 0
        try:
            content: bytes | None = None
            reply = session.refusal
            if reply is None:
                try:
                    verdict = await self.policy.check(session.mail_from, session.rcpts, data)
                except Exception:
                    log.exception("filtering failed")
                    verdict = Verdict(LOCAL_ERROR, None)
                reply, content = verdict.reply, verdict.content
                self.policy.count(verdict.encrypted, accepted=reply is None)
            await self._emit(request.session, request.token,
                             data if content is None else content, cleanup=reply is None)  # fmt: skip
            return reply
        finally:
            self.buffered -= size

    async def _emit(
        self, session_id: str, token: str, data: bytes | bytearray, cleanup: bool
    ) -> None:
        """The message back to smtpd as data lines (header cleaned up if it passes), each
        chunk once smtpd has taken the ones before (``drain``): with the protocol prefix,
        the lines of a message of short lines are several times its size."""
        prefix = format_dataline(session_id, token, "")[:-1]
        body_start = 0
        if cleanup:
            header_end = 0 if data.startswith(b"\r\n") else data.find(b"\r\n\r\n") + 2
            if header_end == 1:  # no empty line: all header
                header_end = len(data)
            lines = bytes(data[:header_end]).decode("utf-8", "surrogateescape").split("\r\n")
            cleaned = clean_header_lines(lines[:-1], self.cleanup.drop, self.cleanup.replace)
            self.write("".join(f"{prefix}{stuff(line)}\n" for line in cleaned))
            body_start = header_end
        for chunk in message_dataline_chunks(prefix.encode(), data, body_start):
            self.write(chunk.decode("utf-8", "surrogateescape"))
            await self.drain()
        self.write(f"{prefix}.\n")

    async def _commit(self, session: Session, request: FilterRequest) -> None:
        reply: str | None
        if session.verdict is None:
            log.warning("commit without a message in session %s", request.session)
            reply = LOCAL_ERROR
        else:
            try:
                reply = await session.verdict
            except asyncio.CancelledError:
                return
        session.reset()
        self.write(format_result(request.session, request.token, reply))

    async def _auth(self, request: FilterRequest) -> None:
        """Create the account of a first ``AUTH PLAIN`` login; smtpd checks the password."""
        credentials = plain_credentials(request.params)
        if credentials is not None:
            user, password = credentials
            try:
                await asyncio.to_thread(
                    get_or_create, self.config, user.lower(), password, self.policy.counters
                )
            except Exception:
                log.exception("account lookup/creation failed")
        self.write(format_result(request.session, request.token, None))


async def run(
    smtpd_filter_factory: Callable[[Callable[[str], None]], SmtpdFilter],
    stdin=None,
    stdout=None,
) -> None:
    """Read smtpd's lines from stdin until it closes it, writing answers to stdout."""
    reader, output = await open_stdio(stdin, stdout)
    smtpd_filter = smtpd_filter_factory(output.write)
    smtpd_filter.drain = output.drain
    try:
        async for line in read_lines(reader):
            smtpd_filter.handle_line(line)
    finally:
        if smtpd_filter.tasks:
            await asyncio.wait(set(smtpd_filter.tasks), timeout=10)
        smtpd_filter.close()
        output.close()
    log.info("smtpd closed the filter's input, exiting")


def main(argv: list[str] | None = None) -> int:
    # stdout is the protocol channel: logs go to stderr, which smtpd passes to its log.
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    parser = argparse.ArgumentParser(
        prog="chatmail-smtpd-filter", description=__doc__.split("\n")[0]
    )
    parser.add_argument("ini", type=Path, help="path to chatmail.ini")
    parser.add_argument("mode", choices=MODES)
    args = parser.parse_args(argv)
    config = config_for_main(args.ini)
    if config is None:
        return EXIT_CONFIG
    skip_dkim = skip_dkim_requested(args.mode)
    try:
        asyncio.run(run(lambda write: SmtpdFilter(config, args.mode, write, skip_dkim)))
    except Exception as exc:  # noqa: BLE001 - a bad dns_resolver and the like: one line
        log.error("cannot run the %s filter: %s", args.mode, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
