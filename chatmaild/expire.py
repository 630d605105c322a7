"""Mail and account expiry: the daily ``chatmail-expire`` job and Dovecot's quota warning.

Daily, per mailbox directory (a name with ``@`` directly under the mailboxes dir):

1. ``password`` older than ``delete_inactive_users_after`` days (its mtime is the
   last-login day): the whole mailbox is removed.
2. No ``password``: an empty directory is removed, anything else is reported and kept.
3. Message files (regular files in any ``cur/``, ``new/``, ``tmp/`` at any depth) older
   than ``delete_mails_after`` days are removed, and so are files in ``cur/`` larger
   than 200 000 bytes and older than ``delete_large_after`` days.
4. The top-level ``cur/`` and ``new/`` are trimmed to 70 % of ``max_mailbox_size``,
   oldest first, counting sizes from the ``S=<size>`` in Dovecot's file names; mail
   younger than 24 h is never trimmed.
5. ``maildirsize`` is removed after any removal so Dovecot recalculates the quota.

``chatmail-quota-expire TARGET_MB MAILBOX`` is Dovecot's quota-warning script: step 4
for one mailbox with the given target. Symlinks are never followed: nothing outside the
mailbox tree is read or removed.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .config import DEFAULT_INI_PATH, EXIT_CONFIG, Config, config_for_main

log = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400
MiB = 1024 * 1024
LARGE_MESSAGE_BYTES = 200_000
QUOTA_TARGET_RATIO = 0.7
# Mail this young is never trimmed for quota, and an empty mailbox this young may be an
# account being created right now (doveauth makes the directory, then writes password).
RECENT_S = SECONDS_PER_DAY
MESSAGE_DIRS = ("cur", "new", "tmp")
QUOTA_DIRS = ("cur", "new")

_SIZE_RE = re.compile(r",S=(\d+)")


def parse_dovecot_filename(name: str) -> tuple[int, int] | None:
    """``1700000000.M1P2.host,S=1234,W=1260:2,S`` -> (1700000000, 1234); None otherwise."""
    stamp, _, _ = name.partition(".")
    match = _SIZE_RE.search(name.partition(":")[0])
    if not (stamp.isascii() and stamp.isdigit()) or match is None:
        return None
    return int(stamp), int(match.group(1))


@dataclass(frozen=True)
class MessageFile:
    path: Path
    mtime: float
    size: int

    @property
    def quota_size(self) -> int:
        """The size Dovecot's quota counts (``S=``), the disk size for foreign names."""
        parsed = parse_dovecot_filename(self.path.name)
        return parsed[1] if parsed else self.size


def iter_message_files(maildir: Path, top_level_only: bool = False) -> Iterator[MessageFile]:
    """Regular files in ``cur``/``new``/``tmp`` below ``maildir``, never through symlinks."""
    if top_level_only:
        dirs = [maildir / name for name in QUOTA_DIRS]
    else:
        dirs = [
            Path(dirpath)
            for dirpath, _, _ in os.walk(maildir, followlinks=False)
            if Path(dirpath).name in MESSAGE_DIRS and Path(dirpath) != maildir
        ]
    for directory in dirs:
        try:
            if not stat.S_ISDIR(directory.lstat().st_mode):
                continue
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield MessageFile(Path(entry.path), st.st_mtime, st.st_size)


def select_for_quota(files: list[MessageFile], target_bytes: int, now: float) -> list[MessageFile]:
    """The oldest files whose removal brings the total to ``target_bytes``, sparing recent mail."""
    total = sum(f.quota_size for f in files)
    chosen = []
    for message in sorted(files, key=lambda f: (f.mtime, f.path.name)):
        if total <= target_bytes or message.mtime > now - RECENT_S:
            break
        chosen.append(message)
        total -= message.quota_size
    return chosen


@dataclass(frozen=True)
class ExpirePolicy:
    now: float
    mails_after_s: float
    large_after_s: float
    inactive_after_s: float
    quota_target_bytes: int

    @classmethod
    def from_config(cls, config: Config, now: float) -> ExpirePolicy:
        return cls(
            now=now,
            mails_after_s=config.delete_mails_after * SECONDS_PER_DAY,
            large_after_s=config.delete_large_after * SECONDS_PER_DAY,
            inactive_after_s=config.delete_inactive_users_after * SECONDS_PER_DAY,
            quota_target_bytes=int(config.max_mailbox_size_mb * MiB * QUOTA_TARGET_RATIO),
        )

    def message_expired(self, message: MessageFile) -> bool:
        age = self.now - message.mtime
        if age > self.mails_after_s:
            return True
        return (
            message.size > LARGE_MESSAGE_BYTES
            and age > self.large_after_s
            and message.path.parent.name == "cur"
        )


@dataclass
class MailboxResult:
    mailbox_removed: bool = False
    files_seen: int = 0
    files_removed: int = 0


class Remover:
    """Removes files, or only logs them in a dry run."""

    def __init__(self, remove: bool):
        self.remove = remove

    def file(self, path: Path) -> bool:
        if not self.remove:
            log.info("would remove %s", path)
            return True
        try:
            path.unlink()
        except FileNotFoundError:
            return False  # Dovecot expunged or moved it meanwhile
        except OSError as exc:
            log.error("cannot remove %s: %s", path, exc)
            return False
        log.info("removed %s", path)
        return True

    def tree(self, path: Path) -> bool:
        if not self.remove:
            log.info("would remove mailbox %s", path)
            return True
        errors = []

        def collect(_func, failed_path, exc):
            errors.append(f"{failed_path}: {exc[1] if isinstance(exc, tuple) else exc}")

        # rmtree unlinks symlinks inside the tree instead of following them.
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=collect)
        else:
            shutil.rmtree(path, onerror=collect)
        if errors:
            log.error("cannot fully remove mailbox %s: %s", path, "; ".join(errors[:3]))
            return False
        log.info("removed mailbox %s", path)
        return True

    def empty_dir(self, path: Path) -> bool:
        if not self.remove:
            log.info("would remove empty mailbox %s", path)
            return True
        try:
            path.rmdir()
        except OSError as exc:  # something was created meanwhile
            log.info("kept mailbox %s: %s", path, exc)
            return False
        log.info("removed empty mailbox %s", path)
        return True

    def maildirsize(self, maildir: Path) -> None:
        if self.remove:
            (maildir / "maildirsize").unlink(missing_ok=True)


def expire_mailbox(maildir: Path, policy: ExpirePolicy, remover: Remover) -> MailboxResult:
    result = MailboxResult()
    try:
        password_mtime: float | None = (maildir / "password").lstat().st_mtime
    except FileNotFoundError:
        password_mtime = None

    if password_mtime is not None and policy.now - password_mtime > policy.inactive_after_s:
        result.files_seen = sum(1 for _ in iter_message_files(maildir))
        if remover.tree(maildir):
            result.mailbox_removed = True
            result.files_removed = result.files_seen
        return result

    if password_mtime is None:
        if not any(maildir.iterdir()):
            if policy.now - maildir.lstat().st_mtime > RECENT_S:
                result.mailbox_removed = remover.empty_dir(maildir)
            return result
        log.warning("Skipped deleting %s, doesn't have last_login but isn't empty", maildir)

    messages = list(iter_message_files(maildir))
    result.files_seen = len(messages)
    expired = {m.path for m in messages if policy.message_expired(m)}
    result.files_removed = sum(remover.file(path) for path in sorted(expired))

    remaining = [
        m for m in iter_message_files(maildir, top_level_only=True) if m.path not in expired
    ]
    trimmed = select_for_quota(remaining, policy.quota_target_bytes, policy.now)
    result.files_removed += sum(remover.file(m.path) for m in trimmed)

    if result.files_removed:
        remover.maildirsize(maildir)
    return result


def iter_mailboxes(mailboxes_dir: Path, maxnum: int | None) -> Iterator[Path]:
    names = sorted(
        entry.name
        for entry in os.scandir(mailboxes_dir)
        if "@" in entry.name and entry.is_dir(follow_symlinks=False)
    )
    for name in names[:maxnum]:
        yield mailboxes_dir / name


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def daily_expire_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chatmail-expire", description="Remove old mail and inactive mailboxes."
    )
    parser.add_argument("ini", nargs="?", default=str(DEFAULT_INI_PATH), help="chatmail.ini")
    parser.add_argument("--remove", action="store_true", help="remove (default: dry run)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every removal")
    parser.add_argument(
        "--days", type=int, default=0, metavar="N", help="act as if it were N days later"
    )
    parser.add_argument(
        "--maxnum", type=int, default=None, metavar="N", help="look at most at N mailboxes"
    )
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    config = config_for_main(args.ini)
    if config is None:
        return EXIT_CONFIG
    mailboxes_dir = config.mailboxes_path
    if not mailboxes_dir.is_dir():
        log.error("mailboxes directory %s does not exist", mailboxes_dir)
        return 1

    started = time.monotonic()
    policy = ExpirePolicy.from_config(config, now=time.time() + args.days * SECONDS_PER_DAY)
    remover = Remover(remove=args.remove)
    mailboxes = mailboxes_removed = files = files_removed = 0
    for maildir in iter_mailboxes(mailboxes_dir, args.maxnum):
        try:
            result = expire_mailbox(maildir, policy, remover)
        except OSError as exc:  # e.g. removed by Dovecot or an admin while we looked
            log.error("skipping mailbox %s: %s", maildir, exc)
            continue
        mailboxes += 1
        mailboxes_removed += result.mailbox_removed
        files += result.files_seen
        files_removed += result.files_removed
    elapsed = time.monotonic() - started
    summary = (
        f"Removed {mailboxes_removed} out of {mailboxes} mailboxes "
        f"and {files_removed} out of {files} files in {elapsed:.2f} seconds"
    )
    if not args.remove:
        summary += " (dry run: nothing was removed; pass --remove)"
    print(summary)
    return 0


def quota_expire_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chatmail-quota-expire",
        description="Trim one mailbox to TARGET_MB, oldest mail first (Dovecot quota warning).",
    )
    parser.add_argument("target_mb", type=int, help="target size in MiB")
    parser.add_argument("mailbox", type=Path, help="the mailbox directory")
    parser.add_argument("--ini", default=str(DEFAULT_INI_PATH), help="chatmail.ini")
    args = parser.parse_args(argv)
    _setup_logging(verbose=True)
    config = config_for_main(args.ini)
    if config is None:
        return EXIT_CONFIG
    mailbox: Path = args.mailbox
    try:
        inside = mailbox.parent.resolve() == config.mailboxes_path.resolve()
        is_dir = stat.S_ISDIR(mailbox.lstat().st_mode)
    except OSError as exc:
        log.error("quota-expire: cannot use %s: %s", mailbox, exc)
        return 2
    if not inside or not is_dir or "@" not in mailbox.name:
        log.error("quota-expire: %s is not a mailbox in %s", mailbox, config.mailboxes_path)
        return 2
    if args.target_mb < 0:
        log.error("quota-expire: negative target %d", args.target_mb)
        return 2

    remover = Remover(remove=True)
    files = list(iter_message_files(mailbox, top_level_only=True))
    removed = sum(
        remover.file(m.path) for m in select_for_quota(files, args.target_mb * MiB, time.time())
    )
    if removed:
        remover.maildirsize(mailbox)
    print(f"quota-expire: removed {removed} message(s) from {mailbox.name}")
    return 0


if __name__ == "__main__":
    sys.exit(daily_expire_main())
