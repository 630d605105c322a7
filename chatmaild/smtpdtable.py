"""chatmail-smtpd-table: OpenSMTPD's account table, with doveauth's create-on-login rules.

OpenSMTPD (OpenBSD 7.6, Debian 13's 7.6.0p1) runs table backends as child processes
speaking the smtpd-tables(7) text protocol on stdin/stdout::

    smtpd:  config|smtpd-version|7.6.0      we:  register|auth
            config|protocol|0.1                  register|ready
            config|tablename|chatmail
            config|ready
    smtpd:  table|0.1|1713795082.354255|chatmail|check|auth|1a2b3c4d|alice@x.org:secret
    we:     check-result|1a2b3c4d|found

Queries are ``table|<version>|<timestamp>|<table>|<op>|<service>|<id>[|<key>]`` (``fetch``
has no key; only the key may contain ``|``) and ``table|...|<table>|update|<id>``.
Replies are ``<op>-result|<id>|found[|<value>]``, ``...|not-found`` or ``...|error|<why>``.
Queries run in worker threads and may be answered out of order; each reply line is
written whole.

Services (``--services``, default ``credentials,mailaddrmap,mailaddr``):

- ``credentials`` (lookup): ``<user>:<crypt hash>`` of an existing account; smtpd checks
  the password itself (``crypt_checkpass``, case preserved). Never creates: accounts come
  from IMAP logins (doveauth) or, for an SMTP-first ``AUTH PLAIN`` login, from the
  outgoing filter's ``auth`` phase (:mod:`chatmaild.smtpdfilter`), which runs before this
  lookup. Needs a libc ``crypt`` that knows ``$6$`` (glibc/libxcrypt do; OpenBSD's knows
  only bcrypt).
- ``auth`` (check, key ``<user>:<password>``): smtpd hands the password to us, so a login
  with an unknown address creates the account by the rules of :mod:`chatmaild.accounts`
  and an existing account's password is verified against its stored hash.
- ``userinfo`` (lookup): ``<uid>:<gid>:<home>`` of an existing account (uid/gid of the
  ``vmail`` user).
- ``mailaddrmap`` (lookup): an existing account maps to itself, for smtpd's
  ``senders <table>`` (MAIL FROM must be the login, like Postfix's
  ``reject_sender_login_mismatch``).
- ``mailaddr`` (check, key ``<user>@<domain>``): found for an existing account, for
  smtpd's ``match ... rcpt-to <table>``; a ``+tag`` is ignored, as smtpd's own tables and
  Dovecot do. An unknown recipient then matches no rule and smtpd refuses it at RCPT:
  smtpd 7.6 takes every LMTP error for temporary (OpenSMTPD issue #1276), so Dovecot's
  550 would leave the mail in the queue for days instead of bouncing it.

Why ``auth`` is not the default: OpenSMTPD 7.6's ``table_lookup`` lowercases every key
before sending it, the ``auth`` key ``<user>:<password>`` included (a later fix, carried
as a patch by some ports, exempts ``K_AUTH``). Verified with Debian 13's 7.6.0p1: a first
SMTP login with ``Secret-Pass1`` created the account with the hash of ``secret-pass1``,
so the IMAP login with the real password then fails, and an account made over IMAP
with capitals in its password (``chatmail-newcreds`` generates them) never passes SMTP
AUTH. Use ``auth`` only with an smtpd that passes the key verbatim.

Usage: ``chatmail-smtpd-table [--services credentials,mailaddrmap,mailaddr,auth,userinfo] INI``
(smtpd.conf ``table chatmail "chatmail:<ini>"`` runs ``<libexec>/table-chatmail <ini>``,
a wrapper that adds the options).
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from .accounts import authenticate_or_create, strip_scheme
from .blocklist import Blocklist
from .config import EXIT_CONFIG, Config, config_for_main
from .counters import Counters
from .smtpdproto import ConfigEntry, parse_config_line
from .user import InvalidAddress, UnusablePasswordFile, User

log = logging.getLogger(__name__)

PROTOCOL_VERSION = "0.1"
SERVICES = ("auth", "credentials", "userinfo", "mailaddrmap", "mailaddr")
DEFAULT_SERVICES = ("credentials", "mailaddrmap", "mailaddr")  # see the docstring: not auth
#: smtpd's default ``sub-addr-delim``, Dovecot's default ``recipient_delimiter``.
SUBADDRESS_DELIMITER = "+"
OPERATIONS = ("check", "lookup", "fetch")
WORKERS = 4
MAX_LINE = 64 * 1024


class TableProtocolError(ValueError):
    """A line that is not a valid query; ``op``/``id`` are set when a reply can be addressed."""

    def __init__(self, message: str, op: str | None = None, query_id: str | None = None):
        super().__init__(message)
        self.op = op
        self.query_id = query_id


@dataclass(frozen=True)
class Query:
    table: str
    op: str  # check, lookup or fetch
    service: str
    query_id: str
    key: str | None  # None for fetch


@dataclass(frozen=True)
class Update:
    table: str
    query_id: str


def parse_line(line: str) -> ConfigEntry | Query | Update:
    """Parse one line from smtpd (without the newline)."""
    if line.startswith("config|"):
        entry = parse_config_line(line)
        if entry is None:
            raise TableProtocolError(f"malformed config line {line!r}")
        return entry
    if not line.startswith("table|"):
        raise TableProtocolError(f"unknown event {line.split('|', 1)[0]!r}")
    fields = line.split("|", 7)
    if len(fields) < 6:
        raise TableProtocolError("table query with too few fields")
    _, version, _timestamp, table, op = fields[:5]
    if op == "update":
        if len(fields) != 6:
            raise TableProtocolError("update with extra fields", "update", fields[5])
        return Update(table, fields[5])
    if len(fields) < 7:
        raise TableProtocolError(f"{op} query with too few fields")
    service, query_id = fields[5], fields[6]
    if version != PROTOCOL_VERSION:
        raise TableProtocolError(f"unsupported protocol version {version!r}", op, query_id)
    if op not in OPERATIONS:
        raise TableProtocolError(f"unknown operation {op!r}", op, query_id)
    if op == "fetch":
        return Query(table, op, service, query_id, None)
    if len(fields) != 8:
        raise TableProtocolError(f"{op} query without a key", op, query_id)
    return Query(table, op, service, query_id, fields[7])


def format_reply(op: str, query_id: str, result: str) -> str:
    """``<op>-result|<id>|<result>``; newlines in an error text would split the reply."""
    return f"{op}-result|{query_id}|{result.replace(chr(10), ' ').replace(chr(13), ' ')}\n"


class ChatmailTable:
    """Answers smtpd's queries; :meth:`reply` is synchronous, :meth:`run` the I/O shell."""

    def __init__(
        self,
        config: Config,
        services: tuple[str, ...] = DEFAULT_SERVICES,
        counters: Counters | None = None,
    ):
        unknown = set(services) - set(SERVICES)
        if unknown or not services:
            raise ValueError(f"services must be some of {', '.join(SERVICES)}")
        self.config = config
        self.services = tuple(services)
        self.counters = counters
        self.smtpd_config: dict[str, str] = {}
        self.blocklist = Blocklist(config.blocklist_file)

    # -- answers ----------------------------------------------------------------------

    def reply(self, line: str) -> str | None:
        """The reply line for one query line, or None for lines that get no reply."""
        try:
            request = parse_line(line)
        except TableProtocolError as exc:
            log.warning("bad table request: %s", exc)
            if exc.op and exc.query_id:
                return format_reply(exc.op, exc.query_id, f"error|{exc}")
            return None
        if isinstance(request, ConfigEntry):
            if request.value is not None:
                self.smtpd_config[request.key] = request.value
            return None
        if isinstance(request, Update):
            return format_reply("update", request.query_id, "ok")
        try:
            result = self.answer(request)
        except UnusablePasswordFile as exc:  # smtpd: temporary failure; the file stays
            log.error("%s: failing the lookup until it is repaired", exc)
            result = "error|unusable password file"
        except Exception as exc:  # smtpd gets a temporary failure, we live on
            log.exception("table %s %s failed", request.op, request.service)
            result = f"error|{type(exc).__name__}"
        return format_reply(request.op, request.query_id, result)

    def answer(self, query: Query) -> str:
        """``found``, ``found|<value>``, ``not-found`` or ``error|<why>`` for one query."""
        if query.service not in self.services:
            return f"error|service {query.service!r} not registered"
        if query.op == "fetch":
            return f"error|fetch is not supported for {query.service}"
        if query.service in ("auth", "credentials") and self._blocked(query.key or ""):
            return "not-found"
        if query.service == "auth":
            if query.op != "check":
                return "error|auth supports check only"
            return "found" if self._authenticate(query.key or "") else "not-found"
        if query.service == "mailaddr":
            if query.op != "check":
                return "error|mailaddr supports check only"
            found = self._existing_hash(_without_subaddress(query.key or "")) is not None
            return "found" if found else "not-found"
        if query.service == "mailaddrmap" and query.op == "lookup":
            # smtpd's `listen ... senders <table>`: an account may send as itself only.
            found = self._existing_hash(query.key or "") is not None
            return f"found|{query.key}" if found else "not-found"
        password_hash = self._existing_hash(query.key or "")
        if password_hash is None:
            return "not-found"
        if query.op == "check":
            return "found"
        if query.service == "credentials":
            return f"found|{query.key}:{strip_scheme(password_hash)}"
        uid, gid = _vmail_ids()
        return f"found|{uid}:{gid}:{self.config.mailboxes_path / (query.key or '')}"

    def _authenticate(self, key: str) -> bool:
        addr, sep, password = key.partition(":")
        if not sep:
            log.warning("auth key without ':' refused")
            return False
        # Like Dovecot's default auth_username_format (%Lu): Alice@ and alice@ are one account.
        result = authenticate_or_create(self.config, addr.lower(), password, self.counters)
        return result.ok

    def _blocked(self, key: str) -> bool:
        """Logins of blocked and deleted addresses are refused (BlocklistError: error|)."""
        addr = key.partition(":")[0].lower()
        if self.blocklist.entry(addr) is None:
            return False
        log.info("login refused: %s is blocked", addr)
        return True

    def _existing_hash(self, addr: str) -> str | None:
        if not addr.endswith("@" + self.config.address_domain):
            return None
        try:
            return User(self.config.mailboxes_path, addr.lower()).get_password()
        except InvalidAddress:
            return None

    # -- I/O --------------------------------------------------------------------------

    def run(self, rfile: BinaryIO, wfile: BinaryIO, workers: int = WORKERS) -> None:
        """Handshake, then answer queries until smtpd closes our stdin."""
        write_lock = threading.Lock()

        def write(text: str) -> None:
            with write_lock:
                wfile.write(text.encode("utf-8"))
                wfile.flush()

        def serve(line: str) -> None:
            answer = self.reply(line)
            if answer is not None:
                write(answer)

        registered = False
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="table") as pool:
            while raw := rfile.readline(MAX_LINE + 1):
                if not raw.endswith(b"\n") and len(raw) > MAX_LINE:
                    log.warning("table request longer than %d bytes dropped", MAX_LINE)
                    while raw and not raw.endswith(b"\n"):
                        raw = rfile.readline(MAX_LINE + 1)
                    continue
                line = raw.rstrip(b"\r\n").decode("utf-8", errors="replace")
                if not registered and line == "config|ready":
                    write("".join(f"register|{s}\n" for s in self.services) + "register|ready\n")
                    registered = True
                    log.info(
                        "serving %s to smtpd %s",
                        ",".join(self.services),
                        self.smtpd_config.get("smtpd-version", "?"),
                    )
                elif line.startswith("config|"):
                    serve(line)  # handshake lines are cheap and must be seen in order
                elif line:
                    pool.submit(serve, line)


def _without_subaddress(addr: str) -> str:
    """``alice+news@x`` -> ``alice@x`` (localparts never contain the delimiter)."""
    localpart, at, domain = addr.rpartition("@")
    base = localpart.partition(SUBADDRESS_DELIMITER)[0]
    return f"{base}{at}{domain}" if base else addr


def _vmail_ids() -> tuple[int, int]:
    """Numeric uid/gid of ``vmail`` (smtpd's userinfo needs numbers), else our own."""
    try:
        entry = pwd.getpwnam("vmail")
    except KeyError:
        return os.getuid(), os.getgid()
    return entry.pw_uid, entry.pw_gid


def main(argv: list[str] | None = None) -> int:
    # stdout is the protocol channel: logs go to stderr, which smtpd passes to its log.
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    parser = argparse.ArgumentParser(
        prog="chatmail-smtpd-table", description=__doc__.split("\n")[0]
    )
    parser.add_argument("ini", help="path to chatmail.ini")
    parser.add_argument(
        "--services",
        default=",".join(DEFAULT_SERVICES),
        help=f"comma-separated services to register, of {', '.join(SERVICES)} "
        f"(default: {','.join(DEFAULT_SERVICES)})",
    )
    args = parser.parse_args(argv)
    config = config_for_main(args.ini)
    if config is None:
        return EXIT_CONFIG
    try:
        table = ChatmailTable(
            config,
            tuple(s.strip() for s in args.services.split(",") if s.strip()),
            Counters(config.counters_dir, "smtpdtable"),
        )
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    table.run(sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
