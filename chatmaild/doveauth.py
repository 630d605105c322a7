"""doveauth: Dovecot's passdb and userdb over the dict protocol, creating accounts on login.

Dovecot's side (``driver = dict`` for both passdb and userdb)::

    uri = proxy:/run/doveauth/doveauth.socket:auth
    iterate_disable = no
    iterate_prefix = userdb/
    default_pass_scheme = plain
    password_key = passdb/%Ew"%Eu
    user_key = userdb/%Eu

doveauth never checks a password itself: it answers with the stored hash and Dovecot
compares. So a wrong password fails and never overwrites the hash. A passdb lookup of
an address that has no account yet creates it (rules in :mod:`chatmaild.accounts`).

Usage: ``doveauth SOCKET INI``.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import re
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

from .accounts import get_or_create
from .blocklist import Blocklist, BlocklistError
from .config import EXIT_CONFIG, Config, config_for_main
from .counters import Counters
from .dictproxy import DictProxy, LookupFailed, ProtocolError
from .user import InvalidAddress, UnusablePasswordFile, User, check_address

log = logging.getLogger(__name__)

PASSDB_PREFIX = "shared/passdb/"
USERDB_PREFIX = "shared/userdb/"
VMAIL_USER = "vmail"


def unescape(value: str) -> str:
    """Undo Dovecot's ``%E`` escaping: a backslash makes the next character literal."""
    return split_escaped(value, separator=None)[0]


_ESCAPE = re.compile(r"\\(.?)", re.DOTALL)
_ESCAPE_OR_QUOTE = re.compile(r'\\(.?)|"', re.DOTALL)
_escaped_char = operator.itemgetter(1)  # match -> the escaped character, without Python code


def split_escaped(value: str, separator: str | None = '"') -> list[str]:
    """Split on unescaped ``"`` and unescape (``%Ew"%Eu`` -> [password, user]).

    With ``separator=None`` only unescape. A trailing lone backslash is a ProtocolError.
    """
    if "\\" not in value:
        return value.split(separator) if separator else [value]
    pattern = _ESCAPE_OR_QUOTE if separator else _ESCAPE
    parts, current, pos = [], [], 0
    for match in pattern.finditer(value):
        current.append(value[pos : match.start()])
        pos = match.end()
        if match.group(0) == separator:
            parts.append("".join(current))
            current = []
        elif match.group(1):
            current.append(match.group(1))
        else:
            raise ProtocolError("dangling backslash in escaped value")
    current.append(value[pos:])
    parts.append("".join(current))
    return parts


def parse_passdb_key(rest: str) -> tuple[str, str]:
    """``<esc-password>"<esc-user>`` (after ``shared/passdb/``) -> (password, user)."""
    # Fast path with C-level regex work: the separator is the last quote when the user
    # part holds no escapes (valid addresses never do) and the quote is not escaped.
    sep = rest.rfind('"')
    if sep >= 0 and "\\" not in rest[sep + 1 :]:
        escaped_password = rest[:sep]
        trailing = len(escaped_password) - len(escaped_password.rstrip("\\"))
        if trailing % 2 == 0 and '"' not in _ESCAPE.sub("", escaped_password):
            return _ESCAPE.sub(_escaped_char, escaped_password), rest[sep + 1 :]
    parts = split_escaped(rest)
    if len(parts) != 2:
        raise ProtocolError(f"passdb key needs one unescaped '\"', found {len(parts) - 1}")
    return parts[0], parts[1]


def userdb_reply(
    config: Config, addr: str, password_hash: str, vmail_user: str = VMAIL_USER
) -> str:
    """The JSON object Dovecot's dict passdb/userdb reads its fields from."""
    return json.dumps(
        {
            "addr": addr,
            "home": os.path.join(config.mailboxes_path, addr),
            "uid": vmail_user,
            "gid": vmail_user,
            "password": password_hash,
        }
    )


class AuthDictProxy(DictProxy):
    """passdb/userdb lookups; replies of existing accounts are cached per password file.

    A cache entry is used only while the password file's inode, size and mtime are
    unchanged (one ``stat`` instead of read + JSON per login): an atomic rewrite makes a
    new inode, a deleted account fails the ``stat``, so the cache never answers for an
    account that is gone or changed.
    """

    MAX_CACHED = 100_000

    def __init__(
        self, config: Config, counters: Counters | None = None, vmail_user: str = VMAIL_USER
    ):
        self.config = config
        self.counters = counters
        # uid/gid Dovecot runs mail processes as; tests pass a user their host has
        self.vmail_user = vmail_user
        self._domain_suffix = "@" + config.address_domain
        self._mailboxes = os.fspath(config.mailboxes_path)
        self._replies: dict[str, tuple[tuple[int, int, int], str]] = {}
        self.blocklist = Blocklist(config.blocklist_file)

    def lookup(self, key: str, user: str) -> str | None:
        try:
            return self._lookup(key)
        except UnusablePasswordFile as exc:
            # Dovecot answers "temporary failure"; the account is left as it is.
            log.error("%s: failing the lookup until it is repaired", exc)
            raise LookupFailed("unusable password file") from exc

    def _lookup(self, key: str) -> str | None:
        if key.startswith(PASSDB_PREFIX):
            try:
                password, addr = parse_passdb_key(key[len(PASSDB_PREFIX) :])
            except ProtocolError as exc:
                log.warning("malformed passdb lookup: %s", exc)
                return None
            if self._blocked(addr):
                return None
            cached = self._cached_reply(addr)
            if cached is not None:
                return cached
            account = get_or_create(self.config, addr, password, self.counters)
            if account.password_hash is None:
                return None
            return self._remember(addr, account.password_hash)
        if key.startswith(USERDB_PREFIX):
            try:
                addr = unescape(key[len(USERDB_PREFIX) :])
            except ProtocolError as exc:
                log.warning("malformed userdb lookup: %s", exc)
                return None
            cached = self._cached_reply(addr)
            if cached is not None:
                return cached
            password_hash = self._existing_hash(addr)
            return None if password_hash is None else self._remember(addr, password_hash)
        log.warning("unknown lookup key %r", key)
        return None

    def _blocked(self, addr: str) -> bool:
        """A blocked or deleted address logs in nowhere; an unreadable list fails closed."""
        try:
            if self.blocklist.entry(addr) is None:
                return False
        except BlocklistError as exc:
            log.error("%s: failing logins until it is repaired", exc)
            raise LookupFailed("unreadable block list") from exc
        log.info("login refused: %s is blocked", addr)
        return True

    def loggable_key(self, key: str) -> str:
        """A passdb key without its plaintext password (the address follows the last ``"``)."""
        if not key.startswith(PASSDB_PREFIX):
            return key
        _, quote, addr = key.rpartition('"')
        return f'{PASSDB_PREFIX}<password>"{addr}' if quote else f"{PASSDB_PREFIX}<unparsable>"

    def _password_stat(self, addr: str) -> tuple[int, int, int] | None:
        """Identity of an existing account's password file; None for unsafe/missing."""
        if not addr.endswith(self._domain_suffix):
            return None
        try:
            check_address(addr)
            st = os.stat(os.path.join(self._mailboxes, addr, "password"))
        except (InvalidAddress, OSError):
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def _cached_reply(self, addr: str) -> str | None:
        entry = self._replies.get(addr)
        if entry is None:
            return None
        if self._password_stat(addr) != entry[0]:
            self._replies.pop(addr, None)
            return None
        return entry[1]

    def _remember(self, addr: str, password_hash: str) -> str:
        reply = userdb_reply(self.config, addr, password_hash, self.vmail_user)
        # stat, read, stat: cache only a hash read from the very file identified.
        identity = self._password_stat(addr)
        if (
            identity is not None
            and self._existing_hash(addr) == password_hash
            and self._password_stat(addr) == identity
        ):
            if len(self._replies) >= self.MAX_CACHED:
                self._replies.clear()
            self._replies[addr] = (identity, reply)
        return reply

    def _existing_hash(self, addr: str) -> str | None:
        if not addr.endswith(self._domain_suffix):
            return None
        try:
            return User(self.config.mailboxes_path, addr).get_password()
        except InvalidAddress:
            return None

    def iterate(self, prefix: str, user: str) -> Iterator[tuple[str, str]]:
        """Every mailbox directory (names with ``@``), so ``doveadm ... -A`` works."""
        if prefix != USERDB_PREFIX:
            return
        try:
            entries = sorted(os.scandir(self.config.mailboxes_path), key=lambda e: e.name)
        except FileNotFoundError:
            return
        for entry in entries:
            if "@" in entry.name and entry.is_dir():
                yield USERDB_PREFIX + entry.name, ""


MIGRATION_SKIPPED_PREFIXES = ("ci-", "ac_")  # upstream's throwaway test accounts


def migrate_passdb(config: Config, progress_every: int = 10000) -> int:
    """Move accounts from upstream's old ``passdb.sqlite`` into the mailbox layout.

    Rows of ``users(addr, password, last_login)`` become ``<addr>/password`` files (with
    the last login as mtime); accounts that already have a password file keep it. Then
    the database is renamed to ``passdb.sqlite.old`` and its ``-wal``/``-shm`` siblings
    removed, so this runs once. Returns the number of accounts written.
    """
    path = Path(config.passdb_path)
    if not path.exists():
        return 0
    log.info("migrating accounts from %s", path)
    written = 0
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT addr, password, last_login FROM users")
        for count, (addr, password_hash, last_login) in enumerate(rows, 1):
            if count % progress_every == 0:
                log.info("migrated %d rows", count)
            if not addr or not password_hash or addr.startswith(MIGRATION_SKIPPED_PREFIXES):
                continue
            try:
                user = User(config.mailboxes_path, addr)
            except InvalidAddress as exc:
                log.warning("not migrating %r: %s", addr, exc)
                continue
            try:
                if user.get_password() is not None:
                    continue
            except UnusablePasswordFile as exc:
                log.warning("not migrating over %s", exc)
                continue
            user.set_password(password_hash)
            if last_login:
                user.set_last_login_timestamp(int(last_login))
            written += 1
    path.rename(path.with_name(path.name + ".old"))
    for sibling in path.parent.glob(path.name + "-*"):
        sibling.unlink(missing_ok=True)
    log.info("migrated %d accounts from %s", written, path)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if len(argv) != 2:
        log.error("usage: doveauth SOCKET INI")
        return 2
    socket_path, ini = Path(argv[0]), Path(argv[1])
    config = config_for_main(ini)
    if config is None:
        return EXIT_CONFIG
    try:
        migrate_passdb(config)
    except (sqlite3.Error, OSError) as exc:
        log.error("cannot migrate %s, serving without it: %s", config.passdb_path, exc)
    counters = Counters(config.counters_dir, "doveauth")
    try:
        AuthDictProxy(config, counters).serve_forever(socket_path)
    finally:
        counters.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
