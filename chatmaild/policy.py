"""filtermail's rules, free of any transport: which mail may pass, and the reply refusing it.

Both MTAs decide with :class:`MessagePolicy`: Postfix through the aiosmtpd proxy
(:mod:`chatmaild.filtermail`) and OpenSMTPD through its filter protocol
(:mod:`chatmaild.smtpdfilter`), so the two refuse exactly the same mail with exactly the
same replies. Reply texts and log lines follow upstream's filtermail, which clients and
monitoring read. The header cleanup applied to passing mail is one list too
(``defaults/header_cleanup.json``): the formula renders it into Postfix's header_checks
maps and the OpenSMTPD filter applies it itself.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .blocklist import Blocklist, BlocklistError
from .config import Config
from .counters import Counters
from .dkimverify import DKIMVerifier, TxtLookup
from .mailcheck import (
    Mail,
    MalformedMessage,
    from_address,
    is_autocrypt_setup_message,
    is_encrypted,
    is_mailer_daemon_report,
    is_securejoin,
    is_utf8,
    multipart_frame,
    parse_mail,
)
from .ratelimit import RateLimiter
from .user import InvalidAddress, User

log = logging.getLogger("filtermail")

MODES = ("outgoing", "incoming")
ENCRYPTION_NEEDED = "523 Encryption Needed: Invalid Unencrypted Mail"
TOO_BIG = "552 Message exceeds maximum size"
NON_UTF8 = "554 Non-UTF-8 message"
MALFORMED = "554 Malformed data"
# The preamble OpenPGP/MIME clients write (RFC 3156 examples, Autocrypt, Delta Chat).
OPENPGP_NOTICE = re.compile(
    rb"This is an OpenPGP/MIME encrypted message(?: \(RFC \d{4}(?: and \d{4})?\))?\.?"
)
HEADER_CLEANUP_PATH = Path(__file__).parent / "defaults" / "header_cleanup.json"


@dataclass(frozen=True)
class HeaderCleanup:
    """Header fields taken out of passing mail (lower-case names) or replaced by a line."""

    drop: frozenset[str]
    replace: dict[str, str]


def load_header_cleanup(path: Path = HEADER_CLEANUP_PATH) -> dict[str, HeaderCleanup]:
    """``{"submission": ..., "delivery": ...}``: outgoing mail on its way out, and incoming
    mail at final delivery (Postfix: ``submission_header_cleanup``, ``lmtp_header_cleanup``)."""
    tables = json.loads(path.read_text())
    return {
        stage: HeaderCleanup(
            frozenset(name.lower() for name in table["drop"]),
            {name.lower(): line for name, line in table["replace"].items()},
        )
        for stage, table in tables.items()
    }


def refuses_cleartext(mailboxes_dir: Path, rcpt: str) -> bool:
    """Whether ``rcpt`` wants only encrypted mail; addresses that can't be a mailbox do.

    ``user+tag@domain`` is delivered to ``user@domain`` (Postfix's recipient_delimiter),
    so both mailboxes are asked.
    """
    addr = rcpt.lower()
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        return True
    candidates = {addr, f"{local.split('+', 1)[0]}@{domain}"}
    try:
        users = [User(mailboxes_dir, candidate) for candidate in candidates]
    except InvalidAddress:
        return True
    return any(user.enforce_e2ee_path.exists() for user in users)


def is_ip_literal(domain: str) -> bool:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 §4.1.3), the domain part of an
    IP-address relay's addresses; any other bracketed text is not one."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return False
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def plain_sender(address: str | None) -> str:
    """aiosmtpd reports the null sender ``MAIL FROM:<>`` as ``<>``."""
    return "" if address in (None, "<>") else address


def skip_dkim_requested(mode: str) -> bool:
    """FILTERMAIL_SKIP_DKIM=1|true turns off incoming DKIM checks (tests, never a relay)."""
    skip = os.environ.get("FILTERMAIL_SKIP_DKIM", "").lower() in ("1", "true")
    if skip and mode == "incoming":
        log.warning("DKIM verification DISABLED!")
    return skip


@dataclass(frozen=True)
class Verdict:
    """What the rules say about one message.

    ``reply`` is None if the message may pass, else the SMTP reply refusing it.
    ``encrypted`` is None if the message was refused before its content was looked at.
    ``mail_from`` is the envelope sender to pass it on with (incoming: "" for senders
    that differ from ``From:``, so that nothing ever bounces to a forged address).
    ``content`` is what to pass on instead of the message as received, or None.
    """

    reply: str | None
    encrypted: bool | None
    mail_from: str = ""
    content: bytes | None = None


def without_preamble_and_epilogue(data: bytes | bytearray, mail: Mail) -> bytes | None:
    """The message without the text around its top-level MIME parts, or None if there is
    none but whitespace and the usual OpenPGP/MIME notice (or the message is no multipart).

    RFC 2046 §5.1.1 says to ignore preamble and epilogue, and upstream's filtermail does
    (its MIME parser drops them); but the bytes pass on untouched, so an encrypted message
    could carry any cleartext there to a recipient who refuses cleartext. Refusing would
    turn away OpenPGP/MIME clients whose preamble is some other notice, so other text is
    cut; Delta Chat's and Thunderbird's messages (preamble :data:`OPENPGP_NOTICE`) pass on
    byte for byte.
    """
    frame = multipart_frame(mail.body, mail.headers.get_boundary() or "")
    if frame is None:
        return None
    start, end = frame
    body = mail.body
    preamble = bytes(body[:start]).strip()
    if (not preamble or OPENPGP_NOTICE.fullmatch(preamble)) and not bytes(body[end:]).strip():
        return None
    header_end = len(data) - len(body)
    return b"".join((memoryview(data)[:header_end], body[start:end]))


class MessagePolicy:
    """filtermail's rules for one mode."""

    def __init__(
        self,
        config: Config,
        mode: str,
        skip_dkim: bool = False,
        counters: Counters | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.config = config
        self.mode = mode
        self.outgoing = mode == "outgoing"
        self.counters = counters or Counters(config.counters_dir, f"filtermail-{mode}")
        self.ratelimiter = RateLimiter(
            config.max_user_send_per_minute, config.max_user_send_burst_size
        )
        self.dkim = None if skip_dkim else DKIMVerifier(TxtLookup(config.dns_resolver))
        self.blocklist = Blocklist(config.blocklist_file)

    def check_recipient(self, address: str) -> str | None:
        """The reply refusing RCPT TO ``address`` (a blocked or deleted account), or None."""
        address = address.strip().strip("<>")
        try:
            entry = self.blocklist.entry(address.lower())
        except BlocklistError as exc:
            log.error("%s: deferring mail until it is repaired", exc)
            return "451 4.3.0 Temporary failure, try again later"
        if entry is None:
            return None
        log.info("Rejected mail to a blocked account: %s", address)
        return f"550 5.2.1 <{address}>: mailbox disabled by the relay's operator"

    def check_sender(self, address: str) -> str | None:
        """The reply refusing envelope sender ``address`` (outgoing: rate limit), or None."""
        if not self.outgoing:
            return None
        if address.count("@") != 1:
            return f"500 Invalid from address <{plain_sender(address)}>"
        delay = self.ratelimiter.acquire(address.lower())
        if delay is not None:
            until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() + delay))
            log.info("Rate limited: %s", address)
            return f"450 4.7.1: Too much mail from {address}, rate limited until {until}"
        return None

    def count(self, encrypted: bool | None, accepted: bool) -> None:
        """``mail_filtered_total`` for a message whose content was looked at."""
        if encrypted is None:
            return
        self.counters.inc(
            "mail_filtered_total",
            direction=self.mode,
            encrypted="true" if encrypted else "false",
            result="accepted" if accepted else "rejected",
        )

    async def check(
        self, mail_from: str | None, rcpt_tos: list[str], data: bytes | bytearray
    ) -> Verdict:
        """The verdict on message ``data`` (CRLF lines, dot-unstuffed) of one envelope."""
        if not is_utf8(data):
            return Verdict(NON_UTF8, None)
        try:
            mail = parse_mail(data)
        except MalformedMessage as exc:
            return Verdict(f"{MALFORMED}: {exc}", None)
        from_addr = from_address(mail)
        if from_addr is None:
            values = mail.headers.get_all("From") or []
            problem = (
                "missing"
                if not values
                else f"{len(values)} headers"
                if len(values) > 1
                else "unparsable"
            )
            return Verdict(f"500 Invalid FROM header: {problem}", None)
        if self.outgoing:
            verdict = self._outgoing(plain_sender(mail_from), rcpt_tos, mail, from_addr)
        else:
            verdict = await self._incoming(plain_sender(mail_from), rcpt_tos, mail, from_addr, data)
        if verdict.reply is None and verdict.encrypted:
            content = without_preamble_and_epilogue(data, mail)
            if content is not None:
                log.info("Cut the text around the MIME parts of mail from %s", from_addr)
                return Verdict(None, True, verdict.mail_from, content)
        return verdict

    def _outgoing(self, mail_from: str, rcpt_tos: list[str], mail: Mail, from_addr: str) -> Verdict:
        if from_addr.lower() != mail_from.lower():
            return Verdict(f"500 Invalid FROM <{from_addr}> for <{mail_from}>", None)
        encrypted = is_encrypted(mail, outgoing=True) or is_securejoin(mail)
        if encrypted:
            log.info("Outgoing: Filtering encrypted mail.")
        else:
            log.info("Outgoing: Filtering unencrypted mail.")
            if not is_autocrypt_setup_message(mail, from_addr, rcpt_tos):
                log.info("Rejected unencrypted mail from: %s", from_addr)
                return Verdict(ENCRYPTION_NEEDED, False)
        return Verdict(None, encrypted, mail_from)

    async def _incoming(
        self,
        mail_from: str,
        rcpt_tos: list[str],
        mail: Mail,
        from_addr: str,
        data: bytes | bytearray,
    ) -> Verdict:
        null_sender = not mail_from  # as every bounce has (RFC 5321 §4.5.5)
        if mail_from.lower() != from_addr.lower():
            mail_from = ""  # forwarded (SRS) or forged: never bounce to the envelope sender
        from_domain = from_addr.rsplit("@", 1)[1]
        # IP-address relays (user@[192.0.2.1], user@[IPv6:...]) have no DNS to publish a
        # DKIM key in; upstream's filtermail accepts their mail unauthenticated (it dropped
        # its origin-IP check, chatmail/filtermail PR #90). So does this filter, relying on
        # nothing but encryption: such mail passes no cleartext exception. Other bracketed
        # text is no IP address and needs a DKIM signature like a domain name.
        ip_relay = is_ip_literal(from_domain)
        encrypted = is_encrypted(mail, outgoing=False) or is_securejoin(mail)
        if encrypted:
            log.info("Incoming: Filtering encrypted mail.")
        else:
            log.info("Incoming: Filtering unencrypted mail.")
            # A bounce passes in cleartext only if it really is one: a delivery report
            # with the null envelope sender, from a domain name whose DKIM signature is
            # checked below like any other mail's.
            if null_sender and not ip_relay and is_mailer_daemon_report(mail, from_addr):
                log.info("Incoming: Filtering mailer-daemon message from %s", from_addr)
            elif any(refuses_cleartext(self.config.mailboxes_path, r) for r in rcpt_tos):
                log.info("Rejected unencrypted mail from: %s", from_addr)
                return Verdict(ENCRYPTION_NEEDED, False)
        if self.dkim is not None and not ip_relay:
            signatures = [str(v) for v in mail.headers.get_all("DKIM-Signature") or []]
            problem = await self.dkim.check(data, signatures, from_domain)
            if problem is not None:
                log.info("DKIM check failed for mail from %s: %s", from_addr, problem)
                return Verdict(problem, encrypted)
        return Verdict(None, encrypted, mail_from)
