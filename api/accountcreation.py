"""Opening and closing account creation through chatmail.ini's ``nocreate_file``.

doveauth refuses new accounts while that file exists, whatever it holds, so the file is
the single source of truth. The API writes a JSON object into it (reason, who, when,
until); a file an operator made by hand (``touch /etc/chatmail-nocreate``) is shown with
its text as the reason and its mtime as ``since``.

On the relay ``/etc/chatmail-nocreate`` is a symlink into a directory the API user owns
(see salt/chatmail/api/init.sls): the API replaces or removes the link's *target*, so it
needs no write access to /etc. doveauth's ``exists()`` follows the link.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from chatmaild.config import Config
from chatmaild.fileio import write_text_atomic
from chatmaild.syslimits import exceeded_limit, read_system

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 * 1024


class CreationStateError(Exception):
    """The nocreate file could not be written or removed (permissions, read-only fs)."""


@dataclass(frozen=True)
class CreationState:
    closed: bool
    reason: str | None = None
    by: str | None = None
    since: float | None = None
    until: float | None = None


def parse_nocreate(text: str, mtime: float) -> CreationState:
    """The state a nocreate file describes; pure, for any content an operator may write."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("written_by") == "chatmail-api":
        until = data.get("until")
        return CreationState(
            closed=True,
            reason=str(data.get("reason") or "") or None,
            by=str(data.get("by") or "") or None,
            since=_number(data.get("since"), mtime),
            until=_number(until, None) if until is not None else None,
        )
    reason = " ".join(text.split())[:200] or "nocreate file present"
    return CreationState(closed=True, reason=reason, by="file", since=mtime)


def _number(value: object, default: float | None) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return float(value)


def statvfs_path(path: Path) -> Path:
    """``path`` or its nearest ancestor the API may stat: the mailboxes (vmail, 0700) are
    closed to the API user, their parent's filesystem is the same one."""
    for candidate in (path, *path.parents):
        try:
            os.statvfs(candidate)
            return candidate
        except OSError:
            continue
    return path


def nocreate_target(config: Config) -> Path:
    """The file to replace or remove: the symlink's target if the path is a symlink."""
    return Path(os.path.realpath(config.nocreate_file))


class AccountCreationControl:
    def __init__(self, config: Config, audit_log: Path):
        self.config = config
        self.audit_log = audit_log

    def read(self) -> CreationState:
        path = self.config.nocreate_file
        try:
            with open(path, "rb") as file:
                mtime = os.fstat(file.fileno()).st_mtime
                raw = file.read(MAX_FILE_BYTES)
        except FileNotFoundError:
            return CreationState(closed=False)
        except OSError as exc:
            # doveauth only checks existence: an unreadable file still closes creation.
            return CreationState(closed=True, reason=f"nocreate file unreadable: {exc}", by="file")
        return parse_nocreate(raw.decode("utf-8", "replace"), mtime)

    def current(self, now: float | None = None) -> CreationState:
        """The state, re-opening first if a closing ``until`` has passed."""
        state = self.read()
        now = time.time() if now is None else now
        if state.closed and state.until is not None and state.until <= now:
            try:
                self._remove()
            except CreationStateError as exc:
                log.error("cannot re-open account creation: %s", exc)
                return state
            self._audit("reopen", "until", None, enabled=True, reason="until reached")
            log.info("account creation re-opened: until %s reached", state.until)
            return CreationState(closed=False)
        return state

    def set(
        self,
        enabled: bool,
        reason: str,
        until: float | None,
        by: str,
        client: str | None,
        now: float | None = None,
    ) -> tuple[CreationState, bool]:
        """Open or close; returns the new state and whether anything changed (idempotent)."""
        now = time.time() if now is None else now
        state = self.current(now)
        if enabled:
            if not state.closed:
                return state, False
            self._remove()
            self._audit("open", by, client, enabled=True, reason=reason)
            return CreationState(closed=False), True
        new = CreationState(
            closed=True,
            reason=reason or None,
            by=by,
            since=state.since if state.closed and state.since is not None else now,
            until=until,
        )
        if state.closed and (state.reason, state.by, state.until) == (new.reason, by, until):
            return state, False
        body = {
            "written_by": "chatmail-api",
            "reason": new.reason,
            "by": by,
            "since": new.since,
            "until": until,
        }
        target = nocreate_target(self.config)
        try:
            write_text_atomic(target, json.dumps(body, sort_keys=True) + "\n", mode=0o644)
        except OSError as exc:
            raise CreationStateError(f"cannot write {target}: {exc.strerror or exc}") from None
        self._audit("close", by, client, enabled=False, reason=reason, until=until)
        return new, True

    def system_limit(self) -> str | None:
        """Which system limit (load, memory, disk) would refuse a new account now."""
        readings = read_system(statvfs_path(self.config.mailboxes_path))
        exceeded = exceeded_limit(self.config, readings)
        return exceeded[1] if exceeded else None

    def _remove(self) -> None:
        target = nocreate_target(self.config)
        try:
            target.unlink(missing_ok=True)
        except OSError as exc:
            raise CreationStateError(f"cannot remove {target}: {exc.strerror or exc}") from None

    def _audit(self, action: str, by: str, client: str | None, **fields: object) -> None:
        append_audit(self.audit_log, action, by, client, **fields)


def append_audit(path: Path, action: str, by: str, client: str | None, **fields: object) -> None:
    """One JSON line per change made through the API (account creation, accounts)."""
    entry = {"ts": round(time.time(), 3), "action": action, "by": by, "client": client}
    entry.update(fields)
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)  # one write on O_APPEND: lines never interleave
        finally:
            os.close(fd)
    except OSError as exc:
        log.error("cannot append to audit log %s: %s", path, exc)
