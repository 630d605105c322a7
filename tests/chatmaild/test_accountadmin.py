"""The operator's account tool (chatmaild.accountadmin, chatmail-adminctl) and what a
block does in every daemon that reads the block list: doveauth, the OpenSMTPD table and
filtermail's recipient check (Postfix's filtermail and OpenSMTPD's filter alike)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatmaild import accountadmin, adminctl
from chatmaild.accounts import authenticate_or_create, get_or_create
from chatmaild.blocklist import Blocklist, BlocklistError
from chatmaild.counters import Counters
from chatmaild.dictproxy import LookupFailed
from chatmaild.doveauth import AuthDictProxy
from chatmaild.metadata import Metadata
from chatmaild.policy import MessagePolicy
from chatmaild.smtpdtable import ChatmailTable, Query

DOMAIN = "chat.example.org"
PASSWORD = "password-123"


def passdb_key(addr: str, password: str) -> str:
    return f'shared/passdb/{password}"{addr}'


@pytest.fixture
def account(example_config):
    """An account created by its first login, with one message and a push token."""
    addr = f"blockme01@{DOMAIN}"
    assert authenticate_or_create(example_config, addr, PASSWORD).ok
    cur = example_config.mailboxes_path / addr / "cur"
    cur.mkdir()
    (cur / "1.mail:2,S").write_bytes(b"x" * 1000)
    Metadata(example_config.mailboxes_path).add_token_to_addr(addr, "token-1")
    return addr


def logins(config, addr: str) -> dict:
    """Whether each login path lets ``addr`` in."""
    proxy = AuthDictProxy(config, Counters(None, "doveauth"))
    table = ChatmailTable(config, ("auth", "credentials"))
    cred = table.answer(Query("chatmail", "lookup", "credentials", "1", addr))
    auth = table.answer(Query("chatmail", "check", "auth", "2", f"{addr}:{PASSWORD}"))
    return {
        "dovecot": proxy.lookup(passdb_key(addr, PASSWORD), addr) is not None,
        "smtpd-credentials": cred.startswith("found"),
        "smtpd-auth": auth == "found",
    }


def test_info(example_config, account):
    info = accountadmin.account_info(example_config, account)
    assert info.exists and info.messages == 1 and info.storage_bytes >= 1000
    assert info.enforce_e2ee and info.push_token and info.blocked is None
    assert info.quota_bytes == 500 * 1024 * 1024
    assert info.created is not None and info.last_login is not None
    assert "password" not in json.dumps(info.as_dict())


def test_block_refuses_logins_and_mail_then_unblock(example_config, account):
    policy = MessagePolicy(example_config, "incoming", skip_dkim=True)
    assert logins(example_config, account) == dict.fromkeys(logins(example_config, account), True)
    assert policy.check_recipient(account) is None

    entry, changed = accountadmin.block(example_config, account, "spam", "alice")
    assert changed and entry["reason"] == "spam" and entry["by"] == "alice"
    assert set(logins(example_config, account).values()) == {False}
    reply = policy.check_recipient(f"<{account}>")
    assert reply == f"550 5.2.1 <{account}>: mailbox disabled by the relay's operator"
    outgoing = MessagePolicy(example_config, "outgoing", skip_dkim=True)
    assert outgoing.check_recipient(account.upper()).startswith("550 5.2.1")
    assert (example_config.mailboxes_path / account / "cur" / "1.mail:2,S").exists()
    assert accountadmin.block(example_config, account, "again", "bob")[1] is False

    assert accountadmin.unblock(example_config, account) is True
    assert set(logins(example_config, account).values()) == {True}
    assert policy.check_recipient(account) is None


def test_delete_keeps_the_address_blocked(example_config, account):
    assert accountadmin.delete_account(example_config, account, "abuse", "alice") is True
    assert not (example_config.mailboxes_path / account).exists()
    assert set(logins(example_config, account).values()) == {False}
    refused = get_or_create(example_config, account, "another-password")
    assert refused.password_hash is None and refused.refusal.reason == "blocked"
    assert not (example_config.mailboxes_path / account).exists()
    info = accountadmin.account_info(example_config, account)
    assert not info.exists and info.blocked["deleted"] is True
    # unblocking a deleted address frees it: the next login creates a new account
    assert accountadmin.unblock(example_config, account) is True
    assert authenticate_or_create(example_config, account, "another-password").ok


def test_unknown_accounts_are_404(example_config):
    for call in (
        lambda a: accountadmin.account_info(example_config, a),
        lambda a: accountadmin.block(example_config, a, "", "x"),
        lambda a: accountadmin.unblock(example_config, a),
        lambda a: accountadmin.delete_account(example_config, a, "", "x"),
    ):
        with pytest.raises(accountadmin.NoSuchAccount):
            call(f"nobody123@{DOMAIN}")
    assert not example_config.blocklist_file.exists()


def test_unreadable_block_list_fails_closed(example_config, account):
    example_config.blocklist_file.write_text("{not json")
    with pytest.raises(BlocklistError):
        Blocklist(example_config.blocklist_file).entry(account)
    policy = MessagePolicy(example_config, "incoming", skip_dkim=True)
    assert policy.check_recipient(account).startswith("451 ")
    table = ChatmailTable(example_config, ("auth", "credentials"))
    reply = table.reply(f"table|0.1|0|chatmail|lookup|credentials|1|{account}")
    assert reply == "lookup-result|1|error|BlocklistError\n"
    proxy = AuthDictProxy(example_config, Counters(None, "doveauth"))
    with pytest.raises(LookupFailed):
        proxy.lookup(passdb_key(account, PASSWORD), account)


def _tree(root: Path, skip: Path) -> dict:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            found[str(path)] = path.lstat().st_mtime_ns
    return found


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.text(max_size=300),
        st.sampled_from(
            [
                "../x",
                f"../x@{DOMAIN}",
                f"..@{DOMAIN}",
                f".@{DOMAIN}",
                f"a\0b@{DOMAIN}",
                f"a/b@{DOMAIN}",
                f"@{DOMAIN}",
                "x" * 10_000,
                f"ünï@{DOMAIN}",
            ]
        ),
        st.text(max_size=40).map(lambda s: f"{s}@{DOMAIN}"),
    )
)
def test_any_address_touches_nothing_outside_the_mailboxes(example_config, tmp_path, addr):
    mailboxes = example_config.mailboxes_path
    before = _tree(tmp_path, mailboxes)
    for op in ("info", "block", "unblock", "delete"):
        raw = json.dumps({"op": op, "args": {"address": addr, "by": "t"}}).encode()
        reply = adminctl.handle(example_config, "accounts", "postfix", raw)
        assert reply["ok"] or reply["status"] in (404, 422), reply
    after = _tree(tmp_path, mailboxes)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    # only the block list (and its lock) may change, for an address of this relay
    assert changed <= {
        str(example_config.blocklist_file),
        str(example_config.blocklist_file) + ".lock",
    }
    for path in mailboxes.iterdir():
        assert path.parent == mailboxes


def test_adminctl_process_answers_one_request(example_config, account, ini_path):
    request = json.dumps({"op": "info", "args": {"address": account}}) + "\n"
    done = subprocess.run(
        [sys.executable, "-m", "chatmaild.adminctl", "accounts", str(ini_path)],
        input=request.encode(), capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    reply = json.loads(done.stdout)
    assert reply["ok"] and reply["result"]["address"] == account
    too_long = subprocess.run(
        [sys.executable, "-m", "chatmaild.adminctl", "accounts", str(ini_path)],
        input=b"x" * 70_000 + b"\n", capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    assert json.loads(too_long.stdout)["status"] == 422


def test_adminctl_refuses_other_scopes_operations(example_config):
    raw = json.dumps({"op": "delete", "args": {"id": "ABCDEF123"}}).encode()
    assert adminctl.handle(example_config, "accounts", "postfix", raw)["status"] == 422
    assert adminctl.handle(example_config, "accounts", "postfix", b"[1]")["status"] == 422
