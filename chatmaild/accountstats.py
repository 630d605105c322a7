"""``chatmail-accountstats``: account counts and storage, with fsreport's metric meanings,
from one walk of the mailboxes.

The walk costs one stat per file. On a relay a timer runs it as the mailbox owner and the
control API's /metrics serves the file it writes (the API user cannot read mailboxes);
without that file the API walks in a background thread every ``account_scan_interval_s``.
Either way, scrape cost does not grow with the number of accounts. The walk also reads
every password file: one that exists but holds no valid hash makes its account's logins
fail temporarily (chatmaild.user), which /status reports as ``accounts.password_files``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import DEFAULT_INI_PATH, EXIT_CONFIG, config_for_main
from .fileio import write_text_atomic
from .user import MAX_PASSWORD_FILE, is_stored_hash

log = logging.getLogger(__name__)

#: fsreport's activity windows (days since the last login).
ACTIVE_DAYS = (1, 10, 30, 40, 80, 100, 150)
MAILDIR_LEAVES = frozenset({"cur", "new", "tmp"})
#: Addresses named in the stats (and /status) besides the count: enough to start repairs.
UNUSABLE_EXAMPLES = 10


@dataclass
class AccountStats:
    accounts: dict[str, int] = field(default_factory=lambda: {"all": 0, "ci": 0, "user": 0})
    active: dict[int, int] = field(default_factory=lambda: dict.fromkeys(ACTIVE_DAYS, 0))
    storage: dict[str, int] = field(default_factory=lambda: {"messages": 0, "extra": 0, "total": 0})
    #: Accounts whose password file exists but is unusable (empty, corrupt, unreadable).
    unusable_password_files: int = 0
    unusable_password_examples: list[str] = field(default_factory=list)
    scanned_at: float = 0.0
    duration_s: float = 0.0


@dataclass
class Usage:
    """One mailbox: message files (in Maildir cur/new/tmp) and everything else."""

    messages: int = 0
    message_bytes: int = 0
    extra_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return self.message_bytes + self.extra_bytes


def _walk(path: str, in_maildir_leaf: bool, usage: Usage) -> None:
    try:
        entries = list(os.scandir(path))
    except OSError:
        return  # removed by expiry while we walked, or unreadable: skip
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                _walk(entry.path, entry.name in MAILDIR_LEAVES, usage)
            elif entry.is_file(follow_symlinks=False):
                size = entry.stat(follow_symlinks=False).st_size
                if in_maildir_leaf:
                    usage.messages += 1
                    usage.message_bytes += size
                else:
                    usage.extra_bytes += size
        except OSError:
            continue


def mailbox_usage(maildir: str) -> Usage:
    usage = Usage()
    _walk(maildir, False, usage)
    return usage


def password_file_usable(path: str) -> bool | None:
    """None: no password file; False: one that exists but holds no valid hash."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_PASSWORD_FILE + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return False
    return is_stored_hash(raw.decode("ascii", errors="replace").strip())


def scan_mailboxes(
    mailboxes: Path, now: float | None = None, index: list | None = None
) -> AccountStats:
    """Count accounts (directories with ``@``), recent logins and bytes stored; with
    ``index``, append one ``[address, last_login, bytes, messages]`` row per account."""
    now = time.time() if now is None else now
    started = time.monotonic()
    stats = AccountStats()
    try:
        entries = list(os.scandir(mailboxes))
    except OSError:
        entries = []
    for entry in entries:
        if "@" not in entry.name or not entry.is_dir(follow_symlinks=False):
            continue
        stats.accounts["all"] += 1
        stats.accounts["ci" if entry.name.startswith("ci-") else "user"] += 1
        try:
            last_login = os.stat(os.path.join(entry.path, "password")).st_mtime
        except OSError:
            last_login = None
        if password_file_usable(os.path.join(entry.path, "password")) is False:
            stats.unusable_password_files += 1
            if len(stats.unusable_password_examples) < UNUSABLE_EXAMPLES:
                stats.unusable_password_examples.append(entry.name)
        if last_login is not None:
            age_days = (now - last_login) / 86400
            for days in ACTIVE_DAYS:
                if age_days <= days:
                    stats.active[days] += 1
        usage = mailbox_usage(entry.path)
        stats.storage["messages"] += usage.message_bytes
        stats.storage["extra"] += usage.extra_bytes
        if index is not None:
            login = int(last_login) if last_login is not None else None
            index.append([entry.name, login, usage.total_bytes, usage.messages])
    stats.storage["total"] = stats.storage["messages"] + stats.storage["extra"]
    stats.unusable_password_examples.sort()
    stats.scanned_at = now
    stats.duration_s = time.monotonic() - started
    return stats


def write_stats(stats: AccountStats, path: Path) -> None:
    write_text_atomic(path, json.dumps(asdict(stats), sort_keys=True), mode=0o640)


def write_index(rows: list, scanned_at: float, path: Path) -> None:
    """The account list for ``GET /accounts``, sorted by address."""
    rows.sort(key=lambda row: row[0])
    body = {"scanned_at": scanned_at, "accounts": rows}
    write_text_atomic(path, json.dumps(body, separators=(",", ":")), mode=0o640)


def read_stats(path: Path) -> AccountStats | None:
    """Stats written by :func:`main`; None while there are none yet."""
    try:
        data = json.loads(path.read_text())
        return AccountStats(
            accounts={str(k): int(v) for k, v in data["accounts"].items()},
            active={int(k): int(v) for k, v in data["active"].items()},
            storage={str(k): int(v) for k, v in data["storage"].items()},
            # absent in files written before the count existed
            unusable_password_files=int(data.get("unusable_password_files", 0)),
            unusable_password_examples=[
                str(a) for a in data.get("unusable_password_examples", [])[:UNUSABLE_EXAMPLES]
            ],
            scanned_at=float(data["scanned_at"]),
            duration_s=float(data["duration_s"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable stats %s: %s", path, exc)
        return None


def main(argv: list[str] | None = None) -> int:
    """Scan the mailboxes and write the stats to OUT for the control API."""
    parser = argparse.ArgumentParser(
        prog="chatmail-accountstats", description="Count accounts and storage for /metrics."
    )
    parser.add_argument("ini", nargs="?", default=str(DEFAULT_INI_PATH), help="chatmail.ini")
    parser.add_argument("out", type=Path, help="the stats file the control API reads")
    parser.add_argument("--index", type=Path, help="also write the account list here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = config_for_main(args.ini)
    if config is None:
        return EXIT_CONFIG
    index: list | None = [] if args.index else None
    stats = scan_mailboxes(config.mailboxes_path, index=index)
    write_stats(stats, args.out)
    if args.index and index is not None:
        write_index(index, stats.scanned_at, args.index)
    log.info("%d accounts, %d bytes", stats.accounts["all"], stats.storage["total"])
    if stats.unusable_password_files:
        log.error(
            "%d accounts have an unusable password file (logins fail temporarily): %s",
            stats.unusable_password_files,
            ", ".join(stats.unusable_password_examples),
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
