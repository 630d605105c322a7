"""Create-on-login accounts: the rules doveauth and the OpenSMTPD table backend share.

An account comes into existence at its first login: if the address is free and allowed,
the password given is hashed (SHA512-CRYPT) and stored, and from then on only that
password opens the account. Existing accounts are never judged by the creation rules,
so tightening a rule, ``/etc/chatmail-nocreate`` or a loaded host never locks anybody out.

A new account is refused (``registration rejected: <reason> (...)`` in the log, counter
``registrations_rejected_total{reason}``) when, checked in this order:

- ``nocreate``: ``config.nocreate_file`` exists;
- ``blocked``: the address is in the block list (a deleted or blocked account);
- ``domain``: the address is not ``<localpart>@<config.address_domain>``;
- ``username_invalid``: the address is unusable as a directory name (``/``, ``..``,
  NUL, no ``@``), or the localpart is shorter than ``username_min_length``, longer than
  ``username_max_length`` or not made of ``a-z 0-9 . _ -``;
- ``reserved``: the localpart is one of :data:`RESERVED_LOCALPARTS`;
- ``password_short``: the password is shorter than ``password_min_length``;
- ``load`` / ``memory`` / ``disk``: a system limit is exceeded (:mod:`chatmaild.syslimits`).
"""

from __future__ import annotations

import enum
import hmac
import logging
import re
import warnings
from dataclasses import dataclass

import filelock

from .blocklist import read_entries
from .config import Config
from .counters import Counters
from .syslimits import SystemReadings, exceeded_limit, read_system
from .user import InvalidAddress, User

try:  # Python >= 3.13 dropped the stdlib module; crypt-r is its drop-in copy.
    from crypt_r import METHOD_BLOWFISH, METHOD_SHA512, crypt, mksalt
except ImportError:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from crypt import METHOD_BLOWFISH, METHOD_SHA512, crypt, mksalt

log = logging.getLogger(__name__)

#: Dovecot scheme prefix -> crypt(3) method; SHA512-CRYPT is upstream's and the default.
#: The same schemes as :data:`chatmaild.user.STORED_HASH_FORMATS` (what a file may hold).
CRYPT_METHODS = {"SHA512-CRYPT": METHOD_SHA512, "BLF-CRYPT": METHOD_BLOWFISH}
#: The whole localpart (``fullmatch``: ``$`` would also accept a trailing newline).
LOCALPART_RE = re.compile(r"[a-z0-9._-]+")
LOCK_TIMEOUT_S = 5.0

#: Localparts nobody may register: RFC 2142 role mailboxes (postmaster, abuse, ...) that
#: other servers and humans write to expecting the operator, the bounce and
#: autoresponder senders (mailer-daemon, noreply, echo: upstream's echobot), and the
#: system accounts the relay itself runs as. Most are shorter than the default
#: username_min_length of 9; the list matters for relays with shorter usernames.
RESERVED_LOCALPARTS = frozenset(
    {
        "abuse",
        "admin",
        "administrator",
        "dovecot",
        "echo",
        "hostmaster",
        "info",
        "mailer-daemon",
        "noc",
        "no-reply",
        "nobody",
        "noreply",
        "postfix",
        "postmaster",
        "root",
        "security",
        "support",
        "vmail",
        "webmaster",
        "www",
        "www-data",
    }
)

REJECTION_REASONS = (
    "nocreate",
    "blocked",
    "password_short",
    "username_invalid",
    "domain",
    "reserved",
    "load",
    "memory",
    "disk",
)


@dataclass(frozen=True)
class Refusal:
    reason: str  # one of REJECTION_REASONS: the counter label
    detail: str  # for the log; never contains the password


def check_creation(
    config: Config, addr: str, password: str, readings: SystemReadings | None = None
) -> Refusal | None:
    """Why a new account ``addr`` with ``password`` may not be created, or None if it may.

    ``readings`` defaults to sampling the host now (only when every other rule passed).
    """
    if config.nocreate_file.exists():
        return Refusal("nocreate", f"{config.nocreate_file} exists")
    if addr in read_entries(config.blocklist_file):
        return Refusal("blocked", "address is in the block list")
    user = _user_or_refusal(config, addr)
    if isinstance(user, Refusal):
        return user
    localpart = addr.rpartition("@")[0]
    if not config.username_min_length <= len(localpart) <= config.username_max_length:
        return Refusal(
            "username_invalid",
            f"localpart length {len(localpart)} outside "
            f"{config.username_min_length}..{config.username_max_length}",
        )
    if not LOCALPART_RE.fullmatch(localpart):
        return Refusal("username_invalid", f"localpart {localpart!r} not [a-z0-9._-]+")
    if localpart in RESERVED_LOCALPARTS:
        return Refusal("reserved", f"localpart {localpart!r} is reserved")
    if len(password) < config.password_min_length:
        return Refusal(
            "password_short",
            f"password of {len(password)} characters < password_min_length "
            f"{config.password_min_length}",
        )
    if readings is None:
        readings = read_system(config.mailboxes_path)
    exceeded = exceeded_limit(config, readings)
    if exceeded is not None:
        return Refusal(*exceeded)
    return None


def hash_password(password: str, scheme: str = "SHA512-CRYPT") -> str:
    """``{SHA512-CRYPT}$6$<salt>$<hash>``: the scheme prefix Dovecot understands."""
    return f"{{{scheme}}}{crypt(password, mksalt(CRYPT_METHODS[scheme]))}"


def strip_scheme(stored: str) -> str:
    """The crypt(3) string of a stored hash, without Dovecot's ``{SCHEME}`` prefix."""
    for scheme in CRYPT_METHODS:
        stored = stored.removeprefix(f"{{{scheme}}}")
    return stored


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of ``password`` against a stored (possibly prefixed) hash."""
    crypted = strip_scheme(stored)
    if not crypted.startswith("$"):
        return False  # an unknown scheme: never fall back to comparing plaintext
    try:
        candidate = crypt(password, crypted)
    except (OSError, ValueError):  # NUL in the password, or libc refusing the salt
        return False
    return candidate is not None and hmac.compare_digest(candidate, crypted)


@dataclass(frozen=True)
class Account:
    """An account looked up or created at login; ``password_hash`` None means refused."""

    addr: str
    password_hash: str | None
    created: bool = False
    refusal: Refusal | None = None


def get_or_create(
    config: Config,
    addr: str,
    password: str,
    counters: Counters | None = None,
    readings: SystemReadings | None = None,
) -> Account:
    """The stored hash of ``addr``, creating the account with ``password`` if it is new.

    The password of an existing account is *not* checked here (Dovecot compares it with
    the returned hash). Concurrent first logins store exactly one hash: the account's
    file lock serialises them and the loser sees the winner's hash. A password file
    that exists but is unusable raises :class:`~chatmaild.user.UnusablePasswordFile`:
    the account is never re-created over it.
    """
    user = _user_or_refusal(config, addr)
    if isinstance(user, Refusal):
        return _refuse(addr, user, counters)
    existing = user.get_password()
    if existing is not None:
        return Account(addr, existing)
    refusal = check_creation(config, addr, password, readings)
    if refusal is not None:
        return _refuse(addr, refusal, counters)

    # Hashed first: a password crypt(3) refuses (NUL) leaves no directory behind.
    password_hash = hash_password(password, config.password_scheme)
    user.maildir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with filelock.FileLock(user.lock_path, timeout=LOCK_TIMEOUT_S):
        existing = user.get_password()
        if existing is not None:
            return Account(addr, existing)
        user.set_password(password_hash)
    log.info("Created address: %s", addr)
    if counters is not None:
        counters.inc("accounts_created_total")
    return Account(addr, password_hash, created=True)


def _refuse(addr: str, refusal: Refusal, counters: Counters | None) -> Account:
    log.warning("registration rejected: %s (%s)", refusal.reason, refusal.detail)
    if counters is not None:
        counters.inc("registrations_rejected_total", reason=refusal.reason)
    return Account(addr, None, refusal=refusal)


def _user_or_refusal(config: Config, addr: str) -> User | Refusal:
    """Refuse addresses that are foreign or unsafe before they touch the filesystem."""
    if not addr.endswith("@" + config.address_domain):
        return Refusal("domain", f"address is not in @{config.address_domain}")
    try:
        return User(config.mailboxes_path, addr)
    except InvalidAddress as exc:
        return Refusal("username_invalid", str(exc))


class AuthStatus(enum.Enum):
    OK = "ok"
    CREATED = "created"
    WRONG_PASSWORD = "wrong_password"
    REFUSED = "refused"


@dataclass(frozen=True)
class AuthResult:
    status: AuthStatus
    refusal: Refusal | None = None

    @property
    def ok(self) -> bool:
        return self.status in (AuthStatus.OK, AuthStatus.CREATED)


def authenticate_or_create(
    config: Config,
    addr: str,
    password: str,
    counters: Counters | None = None,
    readings: SystemReadings | None = None,
) -> AuthResult:
    """Log in: verify the password of an existing account, or create a new one."""
    account = get_or_create(config, addr, password, counters, readings)
    if account.password_hash is None:
        return AuthResult(AuthStatus.REFUSED, account.refusal)
    if account.created:
        return AuthResult(AuthStatus.CREATED)
    if verify_password(password, account.password_hash):
        return AuthResult(AuthStatus.OK)
    return AuthResult(AuthStatus.WRONG_PASSWORD)
