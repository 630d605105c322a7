"""The operator's account tool: inspect, block, unblock and delete one account.

One implementation behind the control API (through the ``chatmail-adminctl`` socket
service, which runs as the mailbox owner) and the Salt module ``chatmail.*``. Every
address is validated before it becomes a path: only ``<localpart>@<address_domain>``
without path characters, control characters or more than 254 characters, and the
mailbox must be a real directory directly in the mailboxes directory.

Deleting writes the address into the block list (``deleted: true``) *before* removing
the mailbox, so a login racing the removal cannot re-create the account.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .accountstats import mailbox_usage
from .blocklist import block_entry, read_entries, update_entries
from .config import Config
from .filedict import FileDict
from .metadata import DEVICETOKEN_KEY, valid_tokens
from .user import InvalidAddress, User

#: RFC 5321's path limit less the angle brackets.
MAX_ADDRESS_LENGTH = 254
MAX_REASON_LENGTH = 500


class AddressError(ValueError):
    """Not an address of this relay (the API's 422)."""


class NoSuchAccount(LookupError):
    """No mailbox and no block for the address (the API's 404)."""


def account_user(config: Config, addr: object) -> User:
    """The account ``addr`` names, or AddressError; never touches the filesystem."""
    if not isinstance(addr, str) or not addr:
        raise AddressError("the address must be a non-empty string")
    if len(addr) > MAX_ADDRESS_LENGTH:
        raise AddressError(f"the address is longer than {MAX_ADDRESS_LENGTH} characters")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in addr):
        raise AddressError("the address holds spaces or control characters")
    if not addr.endswith("@" + config.address_domain) or addr.count("@") != 1:
        raise AddressError(f"not an address @{config.address_domain}")
    try:
        return User(config.mailboxes_path, addr)
    except InvalidAddress as exc:
        raise AddressError(str(exc)) from None


def _mailbox_exists(user: User) -> bool:
    """A directory (not a symlink) right in the mailboxes directory."""
    try:
        return stat.S_ISDIR(os.lstat(user.maildir).st_mode)
    except OSError:
        return False


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


@dataclass(frozen=True)
class AccountInfo:
    address: str
    exists: bool
    created: float | None
    last_login: float | None
    storage_bytes: int
    quota_bytes: int
    messages: int
    enforce_e2ee: bool
    push_token: bool
    blocked: dict | None

    def as_dict(self) -> dict:
        return asdict(self)


def account_info(config: Config, addr: str) -> AccountInfo:
    user = account_user(config, addr)
    blocked = read_entries(config.blocklist_file).get(addr)
    exists = _mailbox_exists(user)
    if not exists and blocked is None:
        raise NoSuchAccount(addr)
    usage = mailbox_usage(str(user.maildir)) if exists else None
    push = False
    if exists and user.metadata_path.exists():
        tokens = FileDict(user.metadata_path).read().get(DEVICETOKEN_KEY)
        push = bool(valid_tokens(tokens, time.time()))
    return AccountInfo(
        address=addr,
        exists=exists,
        # touched once, when the account was created (chatmaild.user.set_password)
        created=_mtime(user.enforce_e2ee_path) if exists else None,
        last_login=user.get_last_login_timestamp() if exists else None,
        storage_bytes=usage.total_bytes if usage else 0,
        quota_bytes=config.max_mailbox_size_mb * 1024 * 1024,
        messages=usage.messages if usage else 0,
        enforce_e2ee=exists and user.enforce_e2ee_path.exists(),
        push_token=push,
        blocked=blocked,
    )


def _reason(reason: object) -> str:
    text = str(reason or "")
    if len(text) > MAX_REASON_LENGTH:
        raise AddressError(f"the reason is longer than {MAX_REASON_LENGTH} characters")
    return text


def block(config: Config, addr: str, reason: str, by: str) -> tuple[dict, bool]:
    """Block logins and incoming mail of an existing account; (entry, changed)."""
    user = account_user(config, addr)
    reason = _reason(reason)
    current = read_entries(config.blocklist_file).get(addr)
    if current is None and not _mailbox_exists(user):
        raise NoSuchAccount(addr)
    changed = False

    def change(entries: dict) -> bool:
        nonlocal changed
        if addr in entries:
            return False
        entries[addr] = block_entry(reason, by)
        changed = True
        return True

    entries = update_entries(config.blocklist_file, change)
    return entries[addr], changed


def unblock(config: Config, addr: str) -> bool:
    """Lift a block (a deleted address may then be created again by a login)."""
    user = account_user(config, addr)
    if addr not in read_entries(config.blocklist_file):
        if not _mailbox_exists(user):
            raise NoSuchAccount(addr)
        return False
    removed = False

    def change(entries: dict) -> bool:
        nonlocal removed
        removed = entries.pop(addr, None) is not None
        return removed

    update_entries(config.blocklist_file, change)
    return removed


def delete_account(config: Config, addr: str, reason: str, by: str) -> bool:
    """Remove the mailbox and keep the address blocked; whether a mailbox was removed."""
    user = account_user(config, addr)
    reason = _reason(reason)
    exists = _mailbox_exists(user)
    if not exists and addr not in read_entries(config.blocklist_file):
        raise NoSuchAccount(addr)

    def change(entries: dict) -> bool:
        old = entries.get(addr)
        if old is not None and old.get("deleted"):
            return False
        entries[addr] = block_entry(reason or (old or {}).get("reason", ""), by, deleted=True)
        return True

    update_entries(config.blocklist_file, change)
    if exists:
        shutil.rmtree(user.maildir)  # rmtree never follows symlinks inside the tree
    return exists
