"""doveauth and the account rules: pure parsing, a real dict client over a real UNIX
socket against a running doveauth, Dovecot's own dict client, and concurrency."""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatmaild import accounts
from chatmaild.accounts import (
    RESERVED_LOCALPARTS,
    AuthStatus,
    authenticate_or_create,
    check_creation,
    get_or_create,
    hash_password,
    verify_password,
)
from chatmaild.counters import Counters
from chatmaild.dictproxy import DictClient, DictError, ProtocolError
from chatmaild.doveauth import (
    AuthDictProxy,
    migrate_passdb,
    parse_passdb_key,
    split_escaped,
    unescape,
)
from chatmaild.syslimits import SystemReadings
from chatmaild.user import STORED_HASH_FORMATS, UnusablePasswordFile, User, is_stored_hash

DOMAIN = "chat.example.org"
IDLE_HOST = SystemReadings(load_1m=0.1, available_memory_mb=10_000, free_disk_mb=100_000)


def creation_refusal(config, addr: str, password: str) -> str | None:
    """The counter label refusing a new account, or None if it may be created."""
    refusal = check_creation(config, addr, password)
    return refusal.reason if refusal else None


def escape(value: str) -> str:
    """Dovecot's %E: backslash before \\, " and '."""
    return "".join("\\" + c if c in "\\\"'" else c for c in value)


def passdb_key(addr: str, password: str) -> str:
    return f'shared/passdb/{escape(password)}"{escape(addr)}'


# -- pure parsing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rest", "expected"),
    [
        ('secret123"abc@x.org', ("secret123", "abc@x.org")),
        ('pa\\"ss"abc@x.org', ('pa"ss', "abc@x.org")),
        ('pa\\\\ss"abc@x.org', ("pa\\ss", "abc@x.org")),
        ("pa\\'ss\"abc@x.org", ("pa'ss", "abc@x.org")),
        ('pa/ss"abc@x.org', ("pa/ss", "abc@x.org")),
        ('"abc@x.org', ("", "abc@x.org")),
        ('\\"\\\\\\\'"u@x', ("\"\\'", "u@x")),
    ],
    ids=[
        "plain",
        "escaped-quote",
        "escaped-backslash",
        "escaped-apostrophe",
        "slash",
        "empty-pw",
        "only-escapes",
    ],
)
def test_parse_passdb_key(rest, expected):
    assert parse_passdb_key(rest) == expected


@pytest.mark.parametrize(
    "rest",
    ["no-separator@x.org", 'a"b"c@x.org', 'pw"user\\'],
    ids=["no-separator", "two-separators", "dangling-backslash"],
)
def test_parse_passdb_key_rejects(rest):
    with pytest.raises(ProtocolError):
        parse_passdb_key(rest)


@given(st.text(), st.text())
def test_parse_passdb_key_roundtrips(password, user):
    assert parse_passdb_key(f'{escape(password)}"{escape(user)}') == (password, user)


@given(st.text(alphabet="ab\"\\'@", max_size=12))
def test_parse_passdb_key_fast_path_agrees_with_general_path(rest):
    """Any string: the fast path returns exactly what the escape-by-escape split returns."""
    try:
        general = split_escaped(rest)
    except ProtocolError:
        general = None
    try:
        parsed = parse_passdb_key(rest)
    except ProtocolError:
        parsed = None
    expected = tuple(general) if general is not None and len(general) == 2 else None
    assert parsed == expected


@pytest.mark.parametrize("value", ["plain", 'q"uote', "back\\slash", "it's", "\\\"'/"])
def test_escape_then_unescape_roundtrips(value):
    assert unescape(escape(value)) == value
    assert split_escaped(f'{escape(value)}"{escape(value)}') == [value, value]


# -- the account rules ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("localpart", "allowed"),
    [
        ("a1234", False),
        ("012345", True),
        ("0123456", True),
        ("0123456789", True),
        ("0123456789x", False),
    ],
    ids=["5-too-short", "6-min", "7", "10-max", "11-too-long"],
)
def test_username_length(make_relaxed_config, localpart, allowed):
    config = make_relaxed_config(DOMAIN, username_min_length=6, username_max_length=10)
    refusal = creation_refusal(config, f"{localpart}@{DOMAIN}", "password123")
    assert refusal == (None if allowed else "username_invalid")


@pytest.mark.parametrize(
    ("localpart", "reason"),
    [
        ("abc.def-g", None),
        ("abc_def12", None),
        ("Abcdefghi", "username_invalid"),
        ("abc defgh", "username_invalid"),
        ("abc+defgh", "username_invalid"),
        ("abc!defgh", "username_invalid"),
        ("abc@defgh", "username_invalid"),
        ("abcdéfghi", "username_invalid"),
        ("abc/defgh", "username_invalid"),
        ("abc\\defgh", "username_invalid"),
        ("abc..defg", "username_invalid"),
        (".abcdefgh", "username_invalid"),
        ("abcdefgh\n", "username_invalid"),
    ],
    ids=[
        "dot-dash",
        "underscore",
        "uppercase",
        "space",
        "plus",
        "bang",
        "second-at",
        "non-ascii",
        "slash",
        "backslash",
        "dotdot",
        "leading-dot",
        "trailing-newline",
    ],
)
def test_localpart_charset(example_config, localpart, reason):
    assert creation_refusal(example_config, f"{localpart}@{DOMAIN}", "password123") == reason


@pytest.mark.parametrize(
    ("addr", "password", "reason"),
    [
        ("abcdefghi@chat.example.org", "12345678", "password_short"),
        ("abcdefghi@chat.example.org", "123456789", None),
        ("abcdefghi@other.example.org", "password123", "domain"),
        ("abcdefghi@sub.chat.example.org", "password123", "domain"),
        ("abcdefghi", "password123", "domain"),
        ("", "password123", "domain"),
    ],
    ids=["password-8-short", "password-9-ok", "foreign-domain", "subdomain", "no-at", "empty"],
)
def test_password_and_domain(example_config, addr, password, reason):
    assert creation_refusal(example_config, addr, password) == reason


def test_reserved_localparts(make_relaxed_config):
    config = make_relaxed_config(DOMAIN, username_min_length=1, username_max_length=20)
    for name in ("echo", "mailer-daemon", "postmaster", "root", "abuse"):
        assert name in RESERVED_LOCALPARTS
    for name in sorted(RESERVED_LOCALPARTS):
        assert creation_refusal(config, f"{name}@{DOMAIN}", "password123") == "reserved", name
    assert creation_refusal(config, f"postmaster2@{DOMAIN}", "password123") is None


def test_ipv4_relay_addresses(make_relaxed_config):
    config = make_relaxed_config("1.3.3.7")
    assert creation_refusal(config, "abcdefghi@[1.3.3.7]", "password123") is None
    assert creation_refusal(config, "abcdefghi@1.3.3.7", "password123") == "domain"


@pytest.mark.parametrize(
    ("readings", "reason"),
    [
        (SystemReadings(99.0, 10_000, 100_000), "load"),
        (SystemReadings(0.1, 10, 100_000), "memory"),
        (SystemReadings(0.1, 10_000, 10), "disk"),
        (SystemReadings(None, None, None), None),
        (SystemReadings(None, 10, None), "memory"),
    ],
    ids=["load", "memory", "disk", "all-unreadable-skipped", "one-unreadable-others-apply"],
)
def test_system_limits_block_creation(make_config, readings, reason):
    config = make_config(DOMAIN)  # upstream defaults: load 5, memory 200M, disk 1G
    refusal = check_creation(config, f"abcdefghi@{DOMAIN}", "password123", readings)
    assert (refusal.reason if refusal else None) == reason


def test_insufficient_resources_block_creation_not_existing_logins(make_config, caplog):
    config = make_config(DOMAIN)
    busy = SystemReadings(load_1m=50.0, available_memory_mb=1, free_disk_mb=1)
    existing = f"existing1@{DOMAIN}"
    assert get_or_create(config, existing, "password123", readings=IDLE_HOST).created
    with caplog.at_level(logging.WARNING):
        refused = get_or_create(config, f"newcomer1@{DOMAIN}", "password123", readings=busy)
    assert refused.password_hash is None and refused.refusal.reason == "load"
    assert "registration rejected: load" in caplog.text
    assert not (config.mailboxes_path / f"newcomer1@{DOMAIN}").exists()
    assert get_or_create(config, existing, "password123", readings=busy).password_hash


def test_real_host_limits_block_creation(make_config):
    """Real readings of this host against limits no host meets."""
    config = make_config(DOMAIN, min_available_memory="100T", max_load_1m=99999)
    assert creation_refusal(config, f"abcdefghi@{DOMAIN}", "password123") == "memory"
    config = make_config(
        DOMAIN, min_free_disk_space="100T", max_load_1m=99999, min_available_memory="0"
    )
    assert creation_refusal(config, f"abcdefghi@{DOMAIN}", "password123") == "disk"


def test_nocreate_blocks_new_accounts_not_existing(example_config):
    existing = f"existing1@{DOMAIN}"
    assert get_or_create(example_config, existing, "password123").created
    example_config.nocreate_file.touch()
    refused = get_or_create(example_config, f"newcomer1@{DOMAIN}", "password123")
    assert refused.refusal.reason == "nocreate"
    assert authenticate_or_create(example_config, existing, "password123").status == AuthStatus.OK


def test_hash_format_and_verify():
    stored = hash_password("password123")
    assert stored.startswith("{SHA512-CRYPT}$6$")
    assert verify_password("password123", stored)
    assert verify_password("password123", stored.removeprefix("{SHA512-CRYPT}"))
    assert not verify_password("password124", stored)
    assert not verify_password("password123", "{PLAIN}password123")
    assert not verify_password("pass\0word", stored)


def test_authenticate_or_create(example_config):
    addr = f"abcdefghi@{DOMAIN}"
    assert authenticate_or_create(example_config, addr, "password123").status == AuthStatus.CREATED
    assert authenticate_or_create(example_config, addr, "password123").status == AuthStatus.OK
    assert (
        authenticate_or_create(example_config, addr, "wrongpassw").status
        == AuthStatus.WRONG_PASSWORD
    )
    refused = authenticate_or_create(example_config, f"ab@{DOMAIN}", "password123")
    assert refused.status == AuthStatus.REFUSED and refused.refusal.reason == "username_invalid"


def test_counters_and_log_lines(example_config, caplog):
    counters = Counters(None, "doveauth")
    with caplog.at_level(logging.INFO):
        get_or_create(example_config, f"abcdefghi@{DOMAIN}", "password123", counters)
        get_or_create(example_config, f"abcdefghi@{DOMAIN}", "password123", counters)
        get_or_create(example_config, f"abcdefgh2@{DOMAIN}", "zq9x", counters)
        get_or_create(example_config, "abcdefgh3@elsewhere.org", "password123", counters)
    assert counters.value("accounts_created_total") == 1
    assert counters.value("registrations_rejected_total", reason="password_short") == 1
    assert counters.value("registrations_rejected_total", reason="domain") == 1
    assert f"Created address: abcdefghi@{DOMAIN}" in caplog.text
    assert caplog.text.count("registration rejected: ") == 2
    assert "zq9x" not in caplog.text and "password123" not in caplog.text


# -- doveauth over a real socket -------------------------------------------------------


@pytest.fixture
def doveauth(example_config, tmp_path, serve_dict):
    """A running doveauth (in a thread) on a real UNIX socket, its path in ``socket_path``."""
    proxy = AuthDictProxy(example_config, Counters(None, "doveauth"))
    proxy.socket_path = serve_dict(proxy, tmp_path / "doveauth.socket")
    return proxy


def test_create_then_lookup(doveauth, gencreds):
    localpart, password = gencreds()
    addr = f"{localpart}@{DOMAIN}"
    with DictClient(doveauth.socket_path) as client:
        created = json.loads(client.lookup(passdb_key(addr, password), addr))
        assert created == {
            "addr": addr,
            "home": str(doveauth.config.mailboxes_path / addr),
            "uid": "vmail",
            "gid": "vmail",
            "password": created["password"],
        }
        assert created["password"].startswith("{SHA512-CRYPT}$6$")
        assert verify_password(password, created["password"])
        assert json.loads(client.lookup(f"shared/userdb/{addr}", addr)) == created
        assert client.lookup(f"shared/userdb/unknown12@{DOMAIN}") is None
    user = User(doveauth.config.mailboxes_path, addr)
    assert user.enforce_e2ee_path.exists()
    assert user.get_password() == created["password"]
    assert doveauth.counters.value("accounts_created_total") == 1


@pytest.mark.parametrize(
    "password",
    [
        'pass"word12',
        "pass'word12",
        "pass\\word12",
        "pass/word12",
        '\\"\'/\\\\""x',
        "pässwörd1234",
        "tab\tnew\nline1",
    ],
    ids=["quote", "apostrophe", "backslash", "slash", "all-specials", "non-ascii", "tab-newline"],
)
def test_special_passwords_survive_the_protocol(doveauth, password):
    addr = f"specials1@{DOMAIN}"
    with DictClient(doveauth.socket_path) as client:
        stored = json.loads(client.lookup(passdb_key(addr, password), addr))["password"]
    assert verify_password(password, stored)


def test_wrong_password_does_not_overwrite(doveauth):
    addr = f"abcdefghi@{DOMAIN}"
    with DictClient(doveauth.socket_path) as client:
        first = json.loads(client.lookup(passdb_key(addr, "password123"), addr))["password"]
        again = json.loads(client.lookup(passdb_key(addr, "otherpass99"), addr))["password"]
    assert again == first
    assert User(doveauth.config.mailboxes_path, addr).get_password() == first
    assert verify_password("password123", first) and not verify_password("otherpass99", first)


def test_refused_logins_answer_not_found(doveauth, tmp_path):
    with DictClient(doveauth.socket_path) as client:
        assert client.lookup(passdb_key(f"abc@{DOMAIN}", "password123")) is None
        assert client.lookup(passdb_key(f"abcdefghi@{DOMAIN}", "short")) is None
        assert client.lookup(passdb_key("abcdefghi@elsewhere.org", "password123")) is None
        assert client.lookup(passdb_key(f"postmaster@{DOMAIN}", "password123")) is None
        doveauth.config.nocreate_file.touch()
        assert client.lookup(passdb_key(f"abcdefghi@{DOMAIN}", "password123")) is None
    assert os.listdir(doveauth.config.mailboxes_path) == []
    rejected = {
        reason: doveauth.counters.value("registrations_rejected_total", reason=reason)
        for reason in ("username_invalid", "password_short", "domain", "nocreate")
    }
    # postmaster is reserved, but with the default 9..9 lengths it is already too long
    assert rejected == {"username_invalid": 2, "password_short": 1, "domain": 1, "nocreate": 1}


@pytest.mark.parametrize(
    "addr",
    [
        f"../../etc@{DOMAIN}",
        f"../abcdefghi@{DOMAIN}",
        f"abc/defgh@{DOMAIN}",
        f"..@{DOMAIN}",
        f"abcd\0efgh@{DOMAIN}",
        f".abcdefgh@{DOMAIN}",
        f"abc..defg@{DOMAIN}",
        f"abcdefghi@{DOMAIN}/../../x@{DOMAIN}",
        "abcdefghi",
    ],
    ids=[
        "dotdot-etc",
        "dotdot-prefix",
        "slash",
        "dotdot-only",
        "nul",
        "leading-dot",
        "inner-dotdot",
        "domain-traversal",
        "no-at",
    ],
)
def test_path_traversal_addresses_never_touch_the_filesystem(doveauth, tmp_path, addr):
    before = sorted(p for p in tmp_path.rglob("*"))
    with DictClient(doveauth.socket_path) as client:
        assert client.lookup(passdb_key(addr, "password123")) is None
        assert client.lookup(f"shared/userdb/{escape(addr)}") is None
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_iterate_lists_mailboxes(doveauth):
    addrs = sorted(f"user{i:05d}@{DOMAIN}" for i in range(3))
    with DictClient(doveauth.socket_path) as client:
        for addr in addrs:
            assert client.lookup(passdb_key(addr, "password123"))
        (doveauth.config.mailboxes_path / "pending_notifications").mkdir()
        (doveauth.config.mailboxes_path / "stray@file").write_text("not a mailbox")
        rows = client.iterate("shared/userdb/")
        assert client.iterate("shared/other/") == []
    assert rows == [(f"shared/userdb/{addr}", "") for addr in addrs]


def test_iterate_without_mailboxes_dir(doveauth):
    shutil.rmtree(doveauth.config.mailboxes_path)
    with DictClient(doveauth.socket_path) as client:
        assert client.iterate("shared/userdb/") == []


def test_hello_is_silent_and_unknown_keys_not_found(doveauth):
    with DictClient(doveauth.socket_path) as client:
        client.send("H3\t2\t0\t\tauth")
        assert client.lookup("shared/unknown/key") is None
        assert client.lookup("shared/passdb/no-separator") is None
        assert client.lookup('shared/passdb/pw"user\\') is None


DICT_GARBAGE = st.lists(
    st.one_of(
        st.text(max_size=60),
        st.binary(max_size=60),
        st.builds(lambda c, t: c + t, st.sampled_from("LIBSUCRHTA"), st.text(max_size=60)),
        st.builds(
            lambda pw, user: f'Lshared/passdb/{pw}"{user}',
            st.text(max_size=20),
            st.text(max_size=30),
        ),
        st.builds(lambda user: f"Lshared/userdb/{user}", st.text(max_size=30)),
    ),
    max_size=5,
)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=DICT_GARBAGE)
def test_random_requests_never_break_doveauth(doveauth, garbage):
    """Random lines (also near-miss passdb/userdb keys) never crash doveauth: it answers on."""
    canary = f"canary000@{DOMAIN}"
    User(doveauth.config.mailboxes_path, canary).set_password(hash_password("password123"))
    with DictClient(doveauth.socket_path, timeout=20) as client:
        for item in garbage:
            data = item if isinstance(item, bytes) else item.encode("utf-8", "surrogatepass")
            client.sock.sendall(data.replace(b"\n", b" ") + b"\n")
        client.send(f"Lshared/userdb/{canary}\t{canary}")
        while not client.read_line().startswith('O{"addr": "canary000@'):
            pass


def test_concurrent_first_logins(doveauth):
    """50 threads on their own connections: 25 race for one address, 25 create their own."""
    shared = f"racer0000@{DOMAIN}"
    results: dict[int, tuple[str, str, str]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(50, timeout=60)

    def login(i: int) -> None:
        addr = shared if i < 25 else f"racer{i:04d}@{DOMAIN}"
        password = f"password-{i:03d}"
        try:
            with DictClient(doveauth.socket_path, timeout=60) as client:
                start.wait()
                for _ in range(5):
                    reply = client.lookup(passdb_key(addr, password), addr)
                    results.setdefault(i, (addr, password, json.loads(reply)["password"]))
                    assert json.loads(reply)["password"] == results[i][2]
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=login, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 50

    shared_hashes = {results[i][2] for i in range(25)}
    assert len(shared_hashes) == 1
    (stored,) = shared_hashes
    assert User(doveauth.config.mailboxes_path, shared).get_password() == stored
    assert is_stored_hash(stored)  # no racer ever read a half-written file as "unusable"
    assert sum(verify_password(results[i][1], stored) for i in range(25)) == 1
    for i in range(25, 50):
        addr, password, password_hash = results[i]
        assert verify_password(password, password_hash)
        assert User(doveauth.config.mailboxes_path, addr).get_password() == password_hash
    assert doveauth.counters.value("accounts_created_total") == 26
    leftovers = [p for p in doveauth.config.mailboxes_path.rglob(".*.tmp")]
    assert leftovers == []


def test_lock_serialises_creation_across_processes(example_config):
    """The file lock also holds against another process (two doveauth instances, one disk)."""
    addr = f"crossproc@{DOMAIN}"
    script = (
        "import sys; from chatmaild.config import read_config; "
        "from chatmaild.accounts import get_or_create; "
        "c = read_config(sys.argv[1]); "
        "print(get_or_create(c, sys.argv[2], sys.argv[3]).password_hash)"
    )
    ini = example_config.mailboxes_path.parent / "chatmail.ini"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(ini), addr, f"password-{i}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    hashes = {proc.communicate(timeout=60)[0].strip() for proc in procs}
    assert len(hashes) == 1
    assert User(example_config.mailboxes_path, addr).get_password() == hashes.pop()


# -- the console script and Dovecot's own client ---------------------------------------


def start_daemon(tmp_path: Path, script: str) -> tuple[subprocess.Popen, Path]:
    """Run ``<script> SOCKET INI`` as its systemd unit does; stderr goes to <script>.log."""
    socket_path = tmp_path / "run" / f"{script}.socket"
    socket_path.parent.mkdir(exist_ok=True)
    exe = Path(sys.executable).parent / script
    log_path = tmp_path / f"{script}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [str(exe), str(socket_path), str(tmp_path / "chatmail.ini")], stderr=log_file
        )
    deadline = time.monotonic() + 20
    while not socket_path.exists():
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, f"{script} did not create its socket"
        time.sleep(0.05)
    return proc, socket_path


@pytest.fixture
def doveauth_process(example_config, tmp_path):
    """``doveauth SOCKET INI`` as the service runs it."""
    proc, socket_path = start_daemon(tmp_path, "doveauth")
    yield socket_path
    proc.terminate()
    proc.wait(timeout=10)


def test_console_script_serves_and_logs(doveauth_process, example_config, tmp_path):
    addr = f"scripted1@{DOMAIN}"
    with DictClient(doveauth_process) as client:
        reply = json.loads(client.lookup(passdb_key(addr, "password123"), addr))
    assert verify_password("password123", reply["password"])
    assert f"Created address: {addr}" in (tmp_path / "doveauth.log").read_text()
    # counters land in config.counters_dir within the flush interval
    counters_file = example_config.counters_dir / "doveauth.json"
    deadline = time.monotonic() + 10
    while not counters_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    data = json.loads(counters_file.read_text())
    assert data["accounts_created_total"][0]["value"] == 1


def test_sigterm_writes_the_last_counts(example_config, tmp_path):
    """systemd's stop (SIGTERM) must not lose counts made since the last periodic flush."""
    proc, socket_path = start_daemon(tmp_path, "doveauth")
    try:
        with DictClient(socket_path) as client:
            for i in range(3):  # the 2nd and 3rd come within the flusher's 1 s pause
                addr = f"sigterm{i:02d}@{DOMAIN}"
                assert client.lookup(passdb_key(addr, "password123"), addr) is not None
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    data = json.loads((example_config.counters_dir / "doveauth.json").read_text())
    assert data["accounts_created_total"][0]["value"] == 3


def test_console_script_usage_error(tmp_path):
    exe = Path(sys.executable).parent / "doveauth"
    result = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "usage: doveauth SOCKET INI" in result.stderr
    result = subprocess.run(
        [str(exe), str(tmp_path / "s"), str(tmp_path / "missing.ini")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2 and "cannot read" in result.stderr


DOVEADM = shutil.which("doveadm")
needs_doveadm = pytest.mark.skipif(DOVEADM is None, reason="doveadm (dovecot-core) not installed")


def doveadm_dict(*args: str) -> subprocess.CompletedProcess:
    # -O: no dovecot.conf needed; the dict client is Dovecot's own proxy driver.
    return subprocess.run(
        [DOVEADM, "-O", "dict", *args], capture_output=True, text=True, timeout=30, check=False
    )


@needs_doveadm
def test_dovecot_dict_client_creates_and_looks_up(doveauth_process, example_config):
    addr = f"dovecot01@{DOMAIN}"
    password = "se\"cr'et\\pass/1"
    uri = f"proxy:{doveauth_process}:auth"
    got = doveadm_dict("get", uri, passdb_key(addr, password))
    assert got.returncode == 0, got.stderr
    reply = json.loads(got.stdout)
    assert reply["addr"] == addr and verify_password(password, reply["password"])

    got = doveadm_dict("get", uri, f"shared/userdb/{addr}")
    assert got.returncode == 0 and json.loads(got.stdout) == reply

    missing = doveadm_dict("get", uri, f"shared/userdb/missing99@{DOMAIN}")
    assert missing.returncode != 0 and "doesn't exist" in missing.stderr

    listed = doveadm_dict("iter", uri, "shared/userdb/")
    assert listed.returncode == 0, listed.stderr
    assert f"shared/userdb/{addr}" in listed.stdout.split()


@needs_doveadm
@pytest.mark.parametrize(
    "password",
    ["tab\tpass\nline\r1", "soh\x01t\x010\x011q\"u'o\\te"],
    ids=["tab-lf-cr", "soh-quotes"],
)
def test_dovecot_dict_client_carries_control_characters(doveauth_process, password):
    """Dovecot 2.3's own dict client tab-escapes the key (what the 2.4 Lua passdb
    imitates): doveauth creates the account with exactly this password."""
    addr = f"ctrlchars@{DOMAIN}"
    got = doveadm_dict("get", f"proxy:{doveauth_process}:auth", passdb_key(addr, password))
    assert got.returncode == 0, got.stderr
    assert verify_password(password, json.loads(got.stdout)["password"])


def test_accounts_module_exports_reasons():
    assert set(accounts.REJECTION_REASONS) == {
        "nocreate",
        "blocked",
        "password_short",
        "username_invalid",
        "domain",
        "reserved",
        "load",
        "memory",
        "disk",
    }


def test_reply_cache_follows_the_password_file(doveauth):
    """Cached replies never outlive the account: deletion and re-creation are seen at once."""
    addr = f"cacheduse@{DOMAIN}"
    user = User(doveauth.config.mailboxes_path, addr)
    with DictClient(doveauth.socket_path) as client:
        first = client.lookup(passdb_key(addr, "password123"), addr)
        assert client.lookup(passdb_key(addr, "password123"), addr) == first  # from the cache
        user.set_last_login_timestamp(172800)  # lastlogin touches the mtime: still the same hash
        assert client.lookup(f"shared/userdb/{addr}", addr) == first
        shutil.rmtree(user.maildir)  # chatmail-expire removed the account
        assert client.lookup(f"shared/userdb/{addr}", addr) is None
        second = client.lookup(passdb_key(addr, "newpassword9"), addr)
        assert second != first
        assert verify_password("newpassword9", json.loads(second)["password"])
        user.set_password(hash_password("replaced99"))  # rewritten in place by an operator
        third = json.loads(client.lookup(f"shared/userdb/{addr}", addr))["password"]
        assert verify_password("replaced99", third)


# -- real Dovecot: its auth process uses doveauth as passdb and userdb -----------------

DOVECOT = shutil.which("dovecot")

AUTH_DICT_CONF = """\
uri = proxy:{socket}:auth
iterate_disable = no
iterate_prefix = userdb/
default_pass_scheme = plain
password_key = passdb/%Ew"%Eu
user_key = userdb/%Eu
"""

# No protocols: Dovecot opens no TCP port, only UNIX sockets under base_dir. The auth
# processes run as root so they can reach the test's root-owned doveauth socket.
DOVECOT_CONF = """\
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
protocols =
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
auth_failure_delay = {failure_delay}
{penalty}
passdb {{
  driver = dict
  args = {base}/auth-dict.conf.ext
}}
userdb {{
  driver = dict
  args = {base}/auth-dict.conf.ext
}}
service auth {{
  user = root
}}
service auth-worker {{
  user = root
}}
"""


#: The formula's throttle settings (salt/chatmail/parameters/defaults.yaml), so this
#: Dovecot throttles exactly like a deployed relay.
AUTH_THROTTLE = yaml.safe_load(
    (Path(__file__).parents[2] / "salt/chatmail/parameters/defaults.yaml").read_text()
)["auth_throttle"]
PENALTY_OFF = "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}"


@pytest.fixture
def dovecot_auth(example_config, sock_dir, serve_dict):
    """Dovecot (auth only) in a private base_dir, its passdb/userdb the running doveauth."""
    if DOVECOT is None or DOVEADM is None:
        pytest.skip("dovecot-core not installed")
    if os.geteuid() != 0:
        pytest.skip("dovecot needs root to run its auth service")
    base = sock_dir
    (base / "state").mkdir()
    proxy = AuthDictProxy(
        example_config, Counters(None, "doveauth"), vmail_user=pwd.getpwuid(os.getuid()).pw_name
    )
    serve_dict(proxy, base / "doveauth.socket")
    (base / "auth-dict.conf.ext").write_text(AUTH_DICT_CONF.format(socket=base / "doveauth.socket"))
    conf = base / "dovecot.conf"
    conf.write_text(
        DOVECOT_CONF.format(
            base=base,
            failure_delay=AUTH_THROTTLE["failure_delay"],
            penalty="" if AUTH_THROTTLE["penalty"] else PENALTY_OFF,
        )
    )
    dovecot = subprocess.Popen([DOVECOT, "-F", "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (base / "run" / "auth-client").exists():
            assert dovecot.poll() is None, (base / "dovecot.log").read_text()
            assert time.monotonic() < deadline, "dovecot did not start"
            time.sleep(0.05)

        def doveadm(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [DOVEADM, "-c", str(conf), *args],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )

        yield doveadm
    finally:
        dovecot.terminate()
        dovecot.wait(timeout=20)


def test_real_dovecot_logins(dovecot_auth, example_config):
    addr = f"dovecot02@{DOMAIN}"
    password = "se\"cr'et\\pass/2"

    first = dovecot_auth("auth", "test", addr, password)
    assert first.returncode == 0 and "auth succeeded" in first.stdout, first.stdout + first.stderr
    stored = User(example_config.mailboxes_path, addr).get_password()
    assert verify_password(password, stored)

    wrong = dovecot_auth("auth", "test", addr, "wrongpassword")
    assert wrong.returncode != 0 and "auth failed" in wrong.stdout
    assert User(example_config.mailboxes_path, addr).get_password() == stored

    again = dovecot_auth("auth", "test", addr.upper(), password)  # Dovecot lowercases (%Lu)
    assert again.returncode == 0 and "auth succeeded" in again.stdout

    refused = dovecot_auth("auth", "test", f"new000001@{DOMAIN}", "admin")
    assert refused.returncode != 0 and "auth failed" in refused.stdout
    assert not (example_config.mailboxes_path / f"new000001@{DOMAIN}").exists()

    userdb = dovecot_auth("user", "-u", addr)
    assert userdb.returncode == 0, userdb.stderr
    assert f"home      : {example_config.mailboxes_path / addr}" in userdb.stdout

    listed = dovecot_auth("user", "*")
    assert listed.returncode == 0 and listed.stdout.split() == [addr]


def timed_login(dovecot_auth, addr: str, password: str, client_ip: str) -> tuple[bool, float]:
    """One SASL PLAIN login as Postfix or imap-login would send it (with the client's
    address as ``rip``): (succeeded, seconds until Dovecot answered)."""
    started = time.monotonic()
    result = dovecot_auth("auth", "test", "-x", f"rip={client_ip}", addr, password)
    return "auth succeeded" in result.stdout, time.monotonic() - started


def test_real_dovecot_throttles_failed_logins_per_address(dovecot_auth, example_config):
    """Repeated wrong passwords from one address wait longer and longer (anvil penalty
    + auth_failure_delay); a first login that creates an account is answered at once, and
    so is a login from another address meanwhile."""
    victim = f"victim000@{DOMAIN}"
    ok, first_login = timed_login(dovecot_auth, victim, "password123", "192.0.2.10")
    assert ok and first_login < 1.0, first_login
    attacker = "198.51.100.7"
    delays = []
    for i in range(3):  # different passwords: Dovecot does not count a repeated one
        ok, seconds = timed_login(dovecot_auth, victim, f"guess{i:04d}xx", attacker)
        assert not ok
        delays.append(seconds)
    # measured with Dovecot 2.3.19 and the defaults: about 1.5, 6 and 10 s
    assert delays[-1] >= 3.5, delays
    assert sum(delays) >= 6.0, delays
    ok, creating = timed_login(dovecot_auth, f"newcomer1@{DOMAIN}", "password456", "192.0.2.11")
    assert ok and creating < 1.0, creating  # another address: no penalty
    ok, again = timed_login(dovecot_auth, victim, "password123", "192.0.2.10")
    assert ok and again < 1.0, again
    assert verify_password(
        "password123", User(example_config.mailboxes_path, victim).get_password()
    )


# -- migration from upstream's passdb.sqlite ------------------------------------------


def make_passdb(path: Path, rows: list[tuple]) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (addr TEXT PRIMARY KEY, password TEXT, last_login INTEGER)")
        db.executemany("INSERT INTO users VALUES (?, ?, ?)", rows)
    db.close()


def test_migrate_passdb(example_config):
    stored = hash_password("password123")
    rows = [(f"user{i:05d}@{DOMAIN}", stored, 200000 if i % 2 else None) for i in range(1000)]
    rows += [(f"ci-abcdef@{DOMAIN}", stored, 1), (f"ac_abcdef@{DOMAIN}", stored, 1)]
    rows += [(f"../evil@{DOMAIN}", stored, 1), (f"kept00000@{DOMAIN}", hash_password("old"), 1)]
    keeper = User(example_config.mailboxes_path, f"kept00000@{DOMAIN}")
    keeper.set_password(hash_password("newer-password"))
    path = example_config.passdb_path
    make_passdb(path, rows)
    path.with_name(path.name + "-wal").write_text("")

    assert migrate_passdb(example_config, progress_every=100) == 1000
    assert not path.exists() and path.with_name(path.name + ".old").exists()
    assert not path.with_name(path.name + "-wal").exists()
    for i in (0, 1, 999):
        user = User(example_config.mailboxes_path, f"user{i:05d}@{DOMAIN}")
        assert user.get_password() == stored and user.enforce_e2ee_path.exists()
    assert (
        User(example_config.mailboxes_path, f"user00001@{DOMAIN}").get_last_login_timestamp()
        == 172800
    )
    assert not (example_config.mailboxes_path / f"ci-abcdef@{DOMAIN}").exists()
    assert not (example_config.mailboxes_path.parent / f"evil@{DOMAIN}").exists()
    assert verify_password("newer-password", keeper.get_password())
    assert migrate_passdb(example_config) == 0  # ran once; the .old file is left alone


def test_console_script_migrates_passdb_at_start(example_config, tmp_path):
    stored = hash_password("password123")
    make_passdb(example_config.passdb_path, [(f"migrated1@{DOMAIN}", stored, 200000)])
    proc, socket_path = start_daemon(tmp_path, "doveauth")
    try:
        with DictClient(socket_path) as client:
            reply = client.lookup(f"shared/userdb/migrated1@{DOMAIN}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert json.loads(reply)["password"] == stored
    assert not example_config.passdb_path.exists()
    assert "migrated 1 accounts" in (tmp_path / "doveauth.log").read_text()


@pytest.mark.parametrize("scheme", ["SHA512-CRYPT", "BLF-CRYPT"])
def test_password_scheme_from_config(make_config, scheme):
    from chatmaild.accounts import get_or_create, verify_password

    config = make_config(
        "chat.example.org",
        password_scheme=scheme,
        max_load_1m=1000,
        min_available_memory="0M",
        min_free_disk_space="0M",
    )
    account = get_or_create(config, "schemeuse@chat.example.org", "Secret-Pass|1")
    assert account.created
    assert account.password_hash.startswith(f"{{{scheme}}}$")
    assert verify_password("Secret-Pass|1", account.password_hash)
    assert not verify_password("secret-pass|1", account.password_hash)


def test_account_never_exists_without_its_e2ee_flag(example_config, monkeypatch):
    """A crash while creating leaves no account, or one that refuses cleartext: never one
    that exists without ``enforceE2EEincoming`` (it would accept cleartext forever)."""
    user = User(example_config.mailboxes_path, f"crashing@{DOMAIN}")

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "touch", crash)
    with pytest.raises(OSError):
        user.set_password("{SHA512-CRYPT}$6$x$y")
    assert user.get_password() is None


def test_failed_lookup_never_logs_the_password(doveauth, caplog):
    """A passdb key carries the plaintext password: a failing lookup must not log it."""
    addr = f"nulpasswd@{DOMAIN}"
    with DictClient(doveauth.socket_path) as client:
        with pytest.raises(DictError):  # crypt(3) refuses NUL: the creation fails
            client.lookup(passdb_key(addr, "Secret\0Pass99"), addr)
        assert client.lookup(f"shared/userdb/{addr}", addr) is None
    assert "lookup of" in caplog.text  # the failure is logged ...
    assert addr in caplog.text
    assert "Secret" not in caplog.text and "Pass99" not in caplog.text  # ... without the password


def test_trailing_newline_localpart_never_becomes_a_directory(doveauth):
    """``$`` matched before a final newline: ``abcdefgh\\n`` passed as a 9-character name."""
    addr = f"abcdefgh\n@{DOMAIN}"
    with DictClient(doveauth.socket_path) as client:
        assert client.lookup(passdb_key(addr, "password123"), addr) is None
    assert os.listdir(doveauth.config.mailboxes_path) == []


# -- unusable password files: a temporary failure, never a new account -----------------

VALID_SHA512 = hash_password("password123")
UNUSABLE_PASSWORD_FILES = {
    "empty": b"",
    "whitespace": b" \n\t\n",
    "non-ascii": "{SHA512-CRYPT}$6$säalt$".encode(),
    "binary": b"\xff\xfe\x00garbage",
    "truncated": VALID_SHA512[:40].encode(),
    "plaintext": b"password123",
    "plain-scheme": b"{PLAIN}password123",
    "no-scheme": VALID_SHA512.removeprefix("{SHA512-CRYPT}").encode(),
    "bad-salt": b"{SHA512-CRYPT}$6$$" + b"a" * 86,
    "wrong-scheme-body": b"{BLF-CRYPT}" + VALID_SHA512.removeprefix("{SHA512-CRYPT}").encode(),
    "two-lines": (VALID_SHA512 + "\n" + VALID_SHA512).encode(),
    "huge": VALID_SHA512.encode() + b"x" * 5000,
}


def write_password_file(config, addr: str, content: bytes) -> Path:
    maildir = config.mailboxes_path / addr
    maildir.mkdir(parents=True, exist_ok=True)
    (maildir / "password").write_bytes(content)
    return maildir / "password"


@pytest.mark.parametrize(
    "content", UNUSABLE_PASSWORD_FILES.values(), ids=UNUSABLE_PASSWORD_FILES.keys()
)
def test_unusable_password_file_is_a_temporary_failure(doveauth, caplog, content):
    """An existing but unusable password file must never hand the account to the next
    login: doveauth answers F (Dovecot: temporary failure), logs it, leaves the file."""
    addr = f"corrupted@{DOMAIN}"
    path = write_password_file(doveauth.config, addr, content)
    with DictClient(doveauth.socket_path) as client:
        for key in (passdb_key(addr, "attacker123"), f"shared/userdb/{addr}"):
            with pytest.raises(DictError):
                client.lookup(key, addr)
        assert client.lookup(f"shared/userdb/other0000@{DOMAIN}") is None  # still serving
    assert path.read_bytes() == content
    assert doveauth.counters.value("accounts_created_total") == 0
    assert f"unusable password file of {addr}" in caplog.text
    assert "attacker123" not in caplog.text


@pytest.mark.parametrize(
    "content", UNUSABLE_PASSWORD_FILES.values(), ids=UNUSABLE_PASSWORD_FILES.keys()
)
def test_get_or_create_never_overwrites_an_unusable_file(example_config, content):
    addr = f"corrupted@{DOMAIN}"
    path = write_password_file(example_config, addr, content)
    with pytest.raises(UnusablePasswordFile):
        get_or_create(example_config, addr, "attacker123")
    with pytest.raises(UnusablePasswordFile):
        authenticate_or_create(example_config, addr, "attacker123")
    assert path.read_bytes() == content


def test_unreadable_password_file_is_a_temporary_failure(example_config):
    addr = f"unreadab1@{DOMAIN}"
    path = write_password_file(example_config, addr, VALID_SHA512.encode())
    path.unlink()
    path.mkdir()  # EISDIR on read: exists, cannot be read
    with pytest.raises(UnusablePasswordFile):
        get_or_create(example_config, addr, "attacker123")


@pytest.mark.parametrize("scheme", sorted(accounts.CRYPT_METHODS))
def test_every_hash_the_relay_writes_is_a_valid_stored_hash(example_config, scheme):
    assert set(STORED_HASH_FORMATS) == set(accounts.CRYPT_METHODS)
    stored = hash_password("password123", scheme)
    assert is_stored_hash(stored)
    user = User(example_config.mailboxes_path, f"hashcheck@{DOMAIN}")
    user.set_password(stored)
    user.password_path.write_text(stored + "\n")  # an operator's `echo HASH > password`
    assert user.get_password() == stored


def test_migration_keeps_an_unusable_password_file(example_config):
    addr = f"corrupted@{DOMAIN}"
    path = write_password_file(example_config, addr, b"")
    make_passdb(example_config.passdb_path, [(addr, hash_password("password123"), 1)])
    assert migrate_passdb(example_config) == 0
    assert path.read_bytes() == b""
