"""Blocked addresses: logins refused, incoming mail refused, data kept.

One JSON file, ``chatmail.ini``'s ``blocklist_file`` (the formula's ``paths.blocklist``):
``{"<addr>": {"reason": ..., "by": ..., "since": <unix time>, "deleted": <bool>}}``.
Deleted accounts stay in it (``deleted: true``) so that nobody re-creates the address by
logging in. The account tool (:mod:`chatmaild.accountadmin`) writes it with lock + temp
file + rename; doveauth, the OpenSMTPD table and the mail filters read it through
:class:`Blocklist`, which re-reads the file only when its identity (inode, size, mtime)
changes: one ``stat`` per lookup.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import filelock

from .fileio import write_text_atomic

log = logging.getLogger(__name__)

#: A list this large is a bug or an attack on the tool, not an operator's blocks.
MAX_FILE_BYTES = 64 * 1024 * 1024
LOCK_TIMEOUT_S = 10.0

Entries = dict[str, dict]


class BlocklistError(OSError):
    """The block list exists but cannot be read: callers fail closed (temporary failure)."""


def read_entries(path: Path) -> Entries:
    """The entries of ``path``; ``{}`` if it does not exist."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise BlocklistError(f"cannot read block list {path}: {exc}") from exc
    if len(raw) > MAX_FILE_BYTES:
        raise BlocklistError(f"block list {path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        data = json.loads(raw or b"{}")
    except ValueError as exc:
        raise BlocklistError(f"block list {path} is not JSON: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise BlocklistError(f"block list {path} is not an object of objects")
    return data


def update_entries(path: Path, change: Callable[[Entries], bool]) -> Entries:
    """Read, let ``change`` edit the entries (it returns whether it changed them), write.

    Serialised by a lock file beside the list; readers never see half a file."""
    path = Path(path)
    with filelock.FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
        entries = read_entries(path)
        if change(entries):
            text = json.dumps(entries, sort_keys=True, indent=0) + "\n"
            write_text_atomic(path, text, mode=0o644)
    return entries


def block_entry(reason: str, by: str, deleted: bool = False, now: float | None = None) -> dict:
    return {
        "reason": reason,
        "by": by,
        "since": round(time.time() if now is None else now, 3),
        "deleted": deleted,
    }


class Blocklist:
    """Cached reader for the daemons: ``blocklist.entry(addr)`` per login or recipient."""

    def __init__(self, path: Path | None):
        self.path = os.fspath(path) if path is not None else None
        self._identity: tuple[int, int, int] | None = None
        self._entries: Entries = {}
        self._lock = threading.Lock()

    def entry(self, addr: str) -> dict | None:
        """The block of ``addr``, or None; raises BlocklistError for an unreadable list."""
        return self.entries().get(addr)

    def entries(self) -> Entries:
        if self.path is None:
            return {}
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise BlocklistError(f"cannot stat block list {self.path}: {exc}") from exc
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if identity != self._identity:
                self._entries = read_entries(Path(self.path))
                self._identity = identity
            return self._entries
