"""Client of ``chatmail-adminctl`` (chatmaild.adminctl), the privileged helper behind
the account and queue routes, and the account index ``GET /accounts`` pages through.

The API runs unprivileged and never reads mailboxes or the queue itself: the helper's
sockets (one per scope, the API's group may connect) do what needs the mailbox owner
or root; the index is the account list ``chatmail-accountstats`` writes as vmail.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException

log = logging.getLogger(__name__)

MAX_REPLY = 16 * 1024 * 1024


async def call(socket_path: Path | None, op: str, args: dict, timeout: float) -> object:
    """The helper's result; HTTPException with the helper's status for its refusals, 503
    when it cannot be reached."""
    if socket_path is None:
        raise HTTPException(503, "this relay runs no chatmail-adminctl helper for this")
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=MAX_REPLY)
            try:
                writer.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
                await writer.drain()
                raw = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError, ValueError) as exc:
        log.error("chatmail-adminctl at %s: %s", socket_path, exc)
        raise HTTPException(503, f"the privileged helper did not answer: {exc}") from None
    try:
        reply = json.loads(raw)
    except ValueError:
        raise HTTPException(503, "the privileged helper gave no answer") from None
    if not reply.get("ok"):
        raise HTTPException(int(reply.get("status", 503)), str(reply.get("error", "failed")))
    return reply["result"]


@dataclass(frozen=True)
class AccountIndex:
    """The account list, sorted three ways once per file version."""

    scanned_at: float
    by_address: list  # rows (address, last_login, bytes, messages)
    addresses: list[str]
    by_last_login: list
    by_size: list

    @classmethod
    def build(cls, scanned_at: float, rows: list) -> AccountIndex:
        # tuples of str/int/None leave the garbage collector's tracking: 100,000 rows
        # must not make every full collection (a latency spike) walk them
        rows = sorted((tuple(r) for r in rows), key=lambda r: r[0])
        return cls(
            scanned_at=scanned_at,
            by_address=rows,
            addresses=[r[0] for r in rows],
            by_last_login=sorted(rows, key=lambda r: -(r[1] or 0)),
            by_size=sorted(rows, key=lambda r: -r[2]),
        )

    def select(self, prefix: str, sort: str) -> list:
        """Rows whose address starts with ``prefix``, in ``sort`` order."""
        if prefix:
            start = bisect.bisect_left(self.addresses, prefix)
            end = bisect.bisect_left(self.addresses, prefix + "\U0010ffff", lo=start)
            rows = self.by_address[start:end]
            if sort == "last_login":
                rows = sorted(rows, key=lambda r: -(r[1] or 0))
            elif sort == "size":
                rows = sorted(rows, key=lambda r: -r[2])
            return rows
        return {"address": self.by_address, "last_login": self.by_last_login}.get(
            sort, self.by_size
        )


class IndexCache:
    """Re-reads the index file only when it changed (inode, size, mtime)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._identity: tuple | None = None
        self.index: AccountIndex | None = None

    def get(self) -> AccountIndex | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return self.index
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        if identity != self._identity:
            try:
                data = json.loads(Path(self.path).read_bytes())
                self.index = AccountIndex.build(float(data["scanned_at"]), data["accounts"])
                self._identity = identity
            except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
                log.warning("ignoring unreadable account index %s: %s", self.path, exc)
        return self.index
