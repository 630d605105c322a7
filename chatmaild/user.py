"""One account's on-disk state, in upstream chatmail's mailbox layout.

``<mailboxes_dir>/<addr>/password`` holds the crypt hash (its mtime is the last-login
day), ``enforceE2EEincoming`` marks accounts that refuse cleartext, ``metadata.json`` holds
device tokens. Dovecot's Maildir lives in the same directory.
"""

from __future__ import annotations

import logging
import os
from functools import cached_property
from pathlib import Path

from .fileio import write_bytes_atomic

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400


class InvalidAddress(ValueError):
    """An address that must never become a path."""


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

        A password file that exists but cannot be read raises OSError: that is a
        temporary failure of the relay, never "no such account" (which would invite a
        creation attempt or a misleading "wrong password").
        """
        try:
            fd = os.open(os.path.join(self._maildir_str, "password"), os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            data = os.read(fd, 4096).decode("ascii").strip()
        except UnicodeDecodeError as exc:
            log.error("unreadable password file for %s: %s", self.addr, exc)
            return None
        finally:
            os.close(fd)
        if not data:
            log.error("empty password file for %s", self.addr)
            return None
        return data

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
