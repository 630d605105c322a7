"""One account's on-disk state, in upstream chatmail's mailbox layout.

``<mailboxes_dir>/<addr>/password`` holds the crypt hash (its mtime is the last-login
day), ``enforceE2EEincoming`` marks accounts that refuse cleartext, ``metadata.json`` holds
device tokens. Dovecot's Maildir lives in the same directory.
"""

from __future__ import annotations

import logging
import os
import re
from functools import cached_property
from pathlib import Path

from .fileio import write_bytes_atomic

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400

#: What a password file must hold, per Dovecot scheme prefix: the crypt(3) string of that
#: scheme. Anything else (empty, truncated, plaintext, another scheme) is never a
#: password: Dovecot would compare it as PLAIN, and "no account" would hand the address
#: to the next login.
STORED_HASH_FORMATS = {
    "SHA512-CRYPT": re.compile(r"\$6\$(rounds=[0-9]+\$)?[./0-9A-Za-z]{1,16}\$[./0-9A-Za-z]{86}"),
    "BLF-CRYPT": re.compile(r"\$2[abxy]\$[0-9]{2}\$[./0-9A-Za-z]{53}"),
}
_STORED_HASH_RE = re.compile(
    "|".join(
        rf"\{{{re.escape(scheme)}\}}(?:{pattern.pattern})"
        for scheme, pattern in STORED_HASH_FORMATS.items()
    )
)
#: Longer than any valid hash: one read decides.
MAX_PASSWORD_FILE = 4096


class InvalidAddress(ValueError):
    """An address that must never become a path."""


class UnusablePasswordFile(OSError):
    """A password file that exists but holds no usable hash: a temporary failure of the
    relay (the account exists; neither "no such account" nor "wrong password")."""


def is_stored_hash(text: str) -> bool:
    """True if ``text`` is ``{SCHEME}<crypt string>`` of a scheme the relay knows."""
    return _STORED_HASH_RE.fullmatch(text) is not None


def check_address(addr: str) -> str:
    """Return ``addr`` if it is safe to use as a directory name, else raise InvalidAddress."""
    if not addr or "@" not in addr:
        raise InvalidAddress(f"address without '@': {addr!r}")
    if "/" in addr or "\\" in addr or "\0" in addr or ".." in addr:
        raise InvalidAddress(f"address with path characters: {addr!r}")
    if addr.startswith("."):
        raise InvalidAddress(f"address starting with '.': {addr!r}")
    return addr


class User:
    # Paths are built on first use: doveauth constructs a User per login lookup and
    # pathlib joins cost more than the rest of a lookup together.
    def __init__(self, mailboxes_dir: Path, addr: str):
        self.addr = check_address(addr)
        self._maildir_str = os.path.join(mailboxes_dir, self.addr)

    @cached_property
    def maildir(self) -> Path:
        return Path(self._maildir_str)

    @cached_property
    def password_path(self) -> Path:
        return self.maildir / "password"

    @cached_property
    def enforce_e2ee_path(self) -> Path:
        return self.maildir / "enforceE2EEincoming"

    @cached_property
    def metadata_path(self) -> Path:
        return self.maildir / "metadata.json"

    @cached_property
    def lock_path(self) -> Path:
        return self.maildir / "password.lock"

    def get_password(self) -> str | None:
        """The stored hash, or None for an account that does not exist (yet).

        A password file that exists but cannot be read, or holds no valid hash (empty,
        whitespace, non-ASCII, truncated, another scheme), raises
        :class:`UnusablePasswordFile` (an OSError): a temporary failure of the relay,
        never "no such account", which would let the next login's password take over
        the account.
        """
        path = os.path.join(self._maildir_str, "password")
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise UnusablePasswordFile(f"cannot open password file of {self.addr}: {exc}") from exc
        try:
            raw = os.read(fd, MAX_PASSWORD_FILE + 1)
        except OSError as exc:
            raise UnusablePasswordFile(f"cannot read password file of {self.addr}: {exc}") from exc
        finally:
            os.close(fd)
        text = raw.decode("ascii", errors="replace").strip()
        if not is_stored_hash(text):
            what = "empty" if not text else f"{len(raw)} bytes, not a known crypt hash"
            raise UnusablePasswordFile(f"unusable password file of {self.addr} ({what})")
        return text

    def set_password(self, password_hash: str) -> None:
        """Store the hash atomically and mark the account as refusing cleartext.

        The flag comes first: the password file is what makes the account exist, so a
        crash in between never leaves an account that accepts cleartext.
        """
        self.maildir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.enforce_e2ee_path.touch()
        write_bytes_atomic(self.password_path, password_hash.encode("ascii"))

    def set_last_login_timestamp(self, timestamp: int) -> None:
        """Record the last login, rounded down to the UTC day to leak little."""
        day = int(timestamp) // SECONDS_PER_DAY * SECONDS_PER_DAY
        try:
            if int(self.password_path.stat().st_mtime) != day:
                os.utime(self.password_path, (day, day))
        except FileNotFoundError:
            log.error("cannot record last login of %s: no password file", self.addr)

    def get_last_login_timestamp(self) -> int | None:
        try:
            return int(self.password_path.stat().st_mtime)
        except FileNotFoundError:
            return None
