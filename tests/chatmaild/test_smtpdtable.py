"""chatmail-smtpd-table: smtpd-tables(7) parsing, handshake, auth with create-on-login,
garbage, and concurrent queries through the real console script on pipes."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatmaild.accounts import get_or_create, verify_password
from chatmaild.smtpdtable import (
    ChatmailTable,
    ConfigEntry,
    Query,
    TableProtocolError,
    Update,
    format_reply,
    parse_line,
)
from chatmaild.user import User

DOMAIN = "chat.example.org"
TS = "1713795082.354255"


def query(op: str, service: str, qid: str, key: str | None = None, table: str = "chatmail") -> str:
    line = f"table|0.1|{TS}|{table}|{op}|{service}|{qid}"
    return line if key is None else f"{line}|{key}"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("config|smtpd-version|7.6.0", ConfigEntry("smtpd-version", "7.6.0")),
        ("config|tablename|chat|mail", ConfigEntry("tablename", "chat|mail")),
        ("config|ready", ConfigEntry("ready", None)),
        (
            query("check", "auth", "1a2b3c4d", "a@x.org:pw"),
            Query("chatmail", "check", "auth", "1a2b3c4d", "a@x.org:pw"),
        ),
        (
            query("check", "auth", "1a2b3c4d", "a@x.org:p|w:x"),
            Query("chatmail", "check", "auth", "1a2b3c4d", "a@x.org:p|w:x"),
        ),
        (
            query("lookup", "credentials", "ff", "a@x.org"),
            Query("chatmail", "lookup", "credentials", "ff", "a@x.org"),
        ),
        (query("check", "auth", "ff", ""), Query("chatmail", "check", "auth", "ff", "")),
        (query("fetch", "source", "ee"), Query("chatmail", "fetch", "source", "ee", None)),
        (f"table|0.1|{TS}|chatmail|update|0badf00d", Update("chatmail", "0badf00d")),
    ],
    ids=[
        "config",
        "config-value-with-pipe",
        "config-ready",
        "check-auth",
        "pipe-in-last-field",
        "lookup",
        "empty-key",
        "fetch-no-key",
        "update",
    ],
)
def test_parse_line(line, expected):
    assert parse_line(line) == expected


@pytest.mark.parametrize(
    ("line", "op", "qid"),
    [
        ("", None, None),
        ("hello world", None, None),
        ("config|", None, None),
        ("table|0.1|ts|t", None, None),
        ("table|0.1|ts|t|check", None, None),
        (query("check", "auth", "abcd"), "check", "abcd"),
        (query("frobnicate", "auth", "abcd", "k"), "frobnicate", "abcd"),
        (f"table|9.9|{TS}|t|check|auth|abcd|k", "check", "abcd"),
        (f"table|0.1|{TS}|t|update|abcd|extra", "update", "abcd"),
    ],
    ids=[
        "empty",
        "prose",
        "config-no-key",
        "too-few-fields",
        "no-service",
        "check-without-key",
        "unknown-op",
        "unknown-version",
        "update-extra",
    ],
)
def test_parse_line_rejects(line, op, qid):
    with pytest.raises(TableProtocolError) as excinfo:
        parse_line(line)
    assert (excinfo.value.op, excinfo.value.query_id) == (op, qid)


def test_format_reply_keeps_one_line():
    assert format_reply("check", "ab", "error|bad\nthing") == "check-result|ab|error|bad thing\n"


# -- answers (synchronous core) --------------------------------------------------------


@pytest.fixture
def table(example_config):
    return ChatmailTable(
        example_config, ("auth", "credentials", "userinfo", "mailaddrmap", "mailaddr")
    )


def test_auth_creates_then_verifies(table, example_config):
    addr = f"abcdefghi@{DOMAIN}"
    assert (
        table.reply(query("check", "auth", "01", f"{addr}:pass|wo:rd1"))
        == "check-result|01|found\n"
    )
    stored = User(example_config.mailboxes_path, addr).get_password()
    assert verify_password("pass|wo:rd1", stored)
    assert (
        table.reply(query("check", "auth", "02", f"{addr}:pass|wo:rd1"))
        == "check-result|02|found\n"
    )
    assert (
        table.reply(query("check", "auth", "03", f"{addr}:wrongpass9"))
        == "check-result|03|not-found\n"
    )
    assert User(example_config.mailboxes_path, addr).get_password() == stored


@pytest.mark.parametrize(
    "key",
    [
        f"ab@{DOMAIN}:password123",
        f"abcdefghi@{DOMAIN}:short",
        "abcdefghi@elsewhere.org:password123",
        f"../../etc@{DOMAIN}:password123",
        "no-colon-at-all",
        "",
    ],
    ids=["username-short", "password-short", "foreign-domain", "traversal", "no-colon", "empty"],
)
def test_auth_refusals_are_not_found(table, example_config, key):
    assert table.reply(query("check", "auth", "0a", key)) == "check-result|0a|not-found\n"
    assert os.listdir(example_config.mailboxes_path) == []


def test_auth_username_is_case_insensitive(table, example_config):
    addr = f"abcdefghi@{DOMAIN}"
    get_or_create(example_config, addr, "Password123")
    assert table.reply(query("check", "auth", "1", f"ABCdefghi@{DOMAIN}:Password123")) == (
        "check-result|1|found\n"
    )
    assert table.reply(query("check", "auth", "2", f"{addr}:password123")) == (
        "check-result|2|not-found\n"
    )


def test_nocreate_blocks_smtp_creation_not_existing(table, example_config):
    addr = f"existing1@{DOMAIN}"
    get_or_create(example_config, addr, "password123")
    example_config.nocreate_file.touch()
    assert (
        table.reply(query("check", "auth", "1", f"{addr}:password123")) == "check-result|1|found\n"
    )
    assert table.reply(query("check", "auth", "2", f"newcomer1@{DOMAIN}:password123")) == (
        "check-result|2|not-found\n"
    )


def test_credentials_and_userinfo(table, example_config):
    addr = f"abcdefghi@{DOMAIN}"
    stored = get_or_create(example_config, addr, "password123").password_hash
    reply = table.reply(query("lookup", "credentials", "c1", addr))
    assert reply == f"lookup-result|c1|found|{addr}:{stored.removeprefix('{SHA512-CRYPT}')}\n"
    assert table.reply(query("check", "credentials", "c2", addr)) == "check-result|c2|found\n"
    assert table.reply(query("lookup", "credentials", "c3", f"nobody123@{DOMAIN}")) == (
        "lookup-result|c3|not-found\n"
    )
    uid, gid, home = (
        table.reply(query("lookup", "userinfo", "u1", addr)).split("|")[3].strip().split(":")
    )
    assert int(uid) >= 0 and int(gid) >= 0 and home == str(example_config.mailboxes_path / addr)
    # smtpd's lookup never creates an account
    assert table.reply(query("lookup", "credentials", "c4", f"newcomer1@{DOMAIN}")) == (
        "lookup-result|c4|not-found\n"
    )
    assert not (example_config.mailboxes_path / f"newcomer1@{DOMAIN}").exists()


def test_mailaddrmap_maps_an_account_to_itself(table, example_config):
    addr = f"abcdefghi@{DOMAIN}"
    get_or_create(example_config, addr, "password123")
    assert table.reply(query("lookup", "mailaddrmap", "m1", addr)) == (
        f"lookup-result|m1|found|{addr}\n"
    )
    assert table.reply(query("lookup", "mailaddrmap", "m2", f"nobody123@{DOMAIN}")) == (
        "lookup-result|m2|not-found\n"
    )
    assert table.reply(query("lookup", "mailaddrmap", "m3", "abcdefghi@elsewhere.org")) == (
        "lookup-result|m3|not-found\n"
    )


def test_mailaddr_matches_existing_accounts_only(table, example_config):
    """smtpd's ``match ... rcpt-to <chatmail>`` (a ``check`` of service ``mailaddr``, key
    lowercased by smtpd): only an existing account receives mail; any other address of
    our domain matches no rule and smtpd refuses it at RCPT. Never creates."""
    addr = f"abcdefghi@{DOMAIN}"
    get_or_create(example_config, addr, "password123")
    expected = {
        addr: "found",
        f"abcdefghi+news@{DOMAIN}": "found",  # smtpd's and Dovecot's subaddress delimiter
        f"nobody123@{DOMAIN}": "not-found",
        f"postmaster@{DOMAIN}": "not-found",  # reserved: never an account (as on Postfix)
        f"mailer-daemon@{DOMAIN}": "not-found",
        f"+abcdefghi@{DOMAIN}": "not-found",
        "abcdefghi@elsewhere.org": "not-found",
        f"../abcdefghi@{DOMAIN}": "not-found",
        "abcdefghi": "not-found",
        "": "not-found",
    }
    for i, (key, result) in enumerate(expected.items()):
        assert table.reply(query("check", "mailaddr", f"r{i}", key)) == (
            f"check-result|r{i}|{result}\n"
        ), key
    assert sorted(os.listdir(example_config.mailboxes_path)) == [addr]
    assert table.reply(query("lookup", "mailaddr", "l1", addr)).startswith(
        "lookup-result|l1|error|"
    )


def test_default_services_never_create(example_config):
    """The default (credentials) only answers for accounts that exist."""
    table = ChatmailTable(example_config)
    assert table.services == ("credentials", "mailaddrmap", "mailaddr")
    line = query("check", "auth", "d1", f"abcdefghi@{DOMAIN}:password123")
    assert table.reply(line).startswith("check-result|d1|error|")
    assert os.listdir(example_config.mailboxes_path) == []


@pytest.mark.parametrize(
    ("line", "reply_prefix"),
    [
        (query("lookup", "auth", "e1", "a@x:y"), "lookup-result|e1|error|"),
        (query("fetch", "auth", "e2"), "fetch-result|e2|error|"),
        (query("check", "alias", "e3", "postmaster"), "check-result|e3|error|"),
        (query("check", "auth", "e4"), "check-result|e4|error|"),
        (query("frobnicate", "auth", "e5", "k"), "frobnicate-result|e5|error|"),
        (f"table|0.1|{TS}|chatmail|update|e6", "update-result|e6|ok"),
    ],
    ids=["auth-lookup", "fetch", "unregistered-service", "missing-key", "unknown-op", "update"],
)
def test_errors_and_update(table, line, reply_prefix):
    reply = table.reply(line)
    assert reply.startswith(reply_prefix) and reply.endswith("\n") and reply.count("\n") == 1


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.text(max_size=80),
        st.builds(lambda rest: "table|" + rest, st.text(max_size=80)),
        st.builds(
            lambda op, service, key: query(op, service, "0000abcd", key),
            st.sampled_from(["check", "lookup", "fetch", "update", "x"]),
            st.sampled_from(["auth", "credentials", "userinfo", "alias", ""]),
            st.text(max_size=40),
        ),
    )
)
def test_random_lines_get_one_line_or_nothing(example_config, line):
    """Whatever smtpd (or noise) sends: no exception, at most one whole reply line."""
    table = ChatmailTable(example_config, ("auth", "credentials", "userinfo"))
    reply = table.reply(line.replace("\n", " "))
    assert reply is None or (reply.endswith("\n") and reply.count("\n") == 1)


def test_unaddressable_garbage_gets_no_reply(table):
    assert table.reply("complete nonsense") is None
    assert table.reply("table|0.1") is None


def test_unknown_services_are_refused(example_config):
    with pytest.raises(ValueError):
        ChatmailTable(example_config, ("auth", "alias"))
    with pytest.raises(ValueError):
        ChatmailTable(example_config, ())


# -- the console script over pipes, as smtpd runs it ------------------------------------


class TableProcess:
    def __init__(self, ini: Path, *args: str):
        exe = Path(sys.executable).parent / "chatmail-smtpd-table"
        self.proc = subprocess.Popen(
            [str(exe), *args, str(ini)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr = b""
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.put(raw.decode())

    def _drain_stderr(self) -> None:
        self.stderr = self.proc.stderr.read()

    def send(self, *lines: str) -> None:
        self.proc.stdin.write("".join(line + "\n" for line in lines).encode())
        self.proc.stdin.flush()

    def read(self, timeout: float = 20) -> str:
        return self.lines.get(timeout=timeout)

    def handshake(self) -> list[str]:
        self.send(
            "config|smtpd-version|7.6.0",
            "config|protocol|0.1",
            "config|tablename|chatmail",
            "config|ready",
        )
        registered = []
        while (line := self.read()) != "register|ready\n":
            registered.append(line)
        return registered

    def close(self) -> int:
        self.proc.stdin.close()
        return self.proc.wait(timeout=20)


@pytest.fixture
def table_process(example_config, tmp_path):
    procs: list[TableProcess] = []

    def start(*args: str) -> TableProcess:
        proc = TableProcess(tmp_path / "chatmail.ini", *args)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()


def test_handshake_registers_credentials_by_default(table_process):
    proc = table_process()
    assert proc.handshake() == [
        "register|credentials\n",
        "register|mailaddrmap\n",
        "register|mailaddr\n",
    ]
    assert proc.close() == 0


def test_handshake_with_services(table_process):
    proc = table_process("--services", "auth,credentials,userinfo")
    assert proc.handshake() == ["register|auth\n", "register|credentials\n", "register|userinfo\n"]
    proc.close()


def test_bad_services_option_exits(table_process):
    proc = table_process("--services", "alias")
    assert proc.proc.wait(timeout=20) == 2


def test_check_found_not_found_and_garbage(table_process, example_config):
    proc = table_process("--services", "auth")
    proc.handshake()
    addr = f"abcdefghi@{DOMAIN}"
    proc.send(query("check", "auth", "00000001", f"{addr}:password123"))
    assert proc.read() == "check-result|00000001|found\n"
    proc.send(query("check", "auth", "00000002", f"{addr}:wrongpassword"))
    assert proc.read() == "check-result|00000002|not-found\n"
    proc.send(
        "garbage without any structure", "\x00\xff", query("frobnicate", "auth", "00000003", "x")
    )
    assert proc.read().startswith("frobnicate-result|00000003|error|")
    proc.send(query("check", "auth", "00000004", f"{addr}:password123"))
    assert proc.read() == "check-result|00000004|found\n"
    assert proc.close() == 0
    assert b"Created address: " + addr.encode() in proc.stderr
    assert verify_password("password123", User(example_config.mailboxes_path, addr).get_password())


def test_concurrent_queries_all_answered_whole(table_process, example_config):
    """Pipelined queries (creations, verifications, errors) answered in any order, whole lines."""
    proc = table_process("--services", "auth")
    proc.handshake()
    expected = {}
    lines = []
    for i in range(60):
        qid = f"{i:08x}"
        if i % 3 == 0:
            key, result = f"concur{i:03d}@{DOMAIN}:password-{i}", "found"
        elif i % 3 == 1:
            key, result = f"racer0000@{DOMAIN}:password-{i}", None  # one of them wins
        else:
            key, result = f"x@{DOMAIN}:password-{i}", "not-found"
        expected[qid] = result
        lines.append(query("check", "auth", qid, key))
    proc.send(*lines)
    answers = {}
    deadline = time.monotonic() + 60
    while len(answers) < len(lines):
        line = proc.read(timeout=max(0.1, deadline - time.monotonic()))
        op, qid, result = line.rstrip("\n").split("|")
        assert op == "check-result" and qid not in answers
        answers[qid] = result
    for qid, result in expected.items():
        if result is not None:
            assert answers[qid] == result, qid
    racers = [qid for qid, result in expected.items() if result is None]
    assert sum(answers[qid] == "found" for qid in racers) == 1
    stored = User(example_config.mailboxes_path, f"racer0000@{DOMAIN}").get_password()
    winner = next(qid for qid in racers if answers[qid] == "found")
    assert verify_password(f"password-{int(winner, 16)}", stored)
    proc.close()


@pytest.mark.parametrize(
    "content",
    [b"", b"  \n", "pässwörd".encode(), b"{PLAIN}password123", b"{SHA512-CRYPT}$6$x$y"],
    ids=["empty", "whitespace", "non-ascii", "plain-scheme", "truncated"],
)
def test_unusable_password_file_is_a_temporary_failure(table, example_config, caplog, content):
    """smtpd's ``error`` reply is its temporary failure (SMTP 4xx): neither a login that
    re-creates the account with the caller's password nor a "no such user"."""
    addr = f"corrupted@{DOMAIN}"
    (example_config.mailboxes_path / addr).mkdir()
    path = example_config.mailboxes_path / addr / "password"
    path.write_bytes(content)
    for i, (op, service, key) in enumerate(
        [
            ("check", "auth", f"{addr}:attacker123"),
            ("lookup", "credentials", addr),
            ("lookup", "userinfo", addr),
            ("lookup", "mailaddrmap", addr),
            ("check", "mailaddr", addr),
        ]
    ):
        reply = table.reply(query(op, service, str(i), key))
        assert reply == f"{op}-result|{i}|error|unusable password file\n"
    assert path.read_bytes() == content
    assert f"unusable password file of {addr}" in caplog.text
    assert "attacker123" not in caplog.text


def test_trailing_newline_localpart_creates_nothing(table, example_config):
    """OpenSMTPD's SMTP-first login must not create ``abcdefgh\\n@...``."""
    key = f"abcdefgh\n@{DOMAIN}:password123"
    assert table.reply(query("check", "auth", "1", key)) == "check-result|1|not-found\n"
    assert os.listdir(example_config.mailboxes_path) == []
