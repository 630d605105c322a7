"""lastlogin: Dovecot's last_login plugin writes, the password file's mtime keeps the day."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatmaild.counters import Counters, read_counters
from chatmaild.dictproxy import DictClient
from chatmaild.lastlogin import LastLoginDictProxy, parse_last_login
from chatmaild.user import User

DOMAIN = "chat.example.org"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        (f"shared/last-login/a@{DOMAIN}", "100000", (f"a@{DOMAIN}", 100000)),
        (f"shared/last-login/a@{DOMAIN}", " 200000 ", (f"a@{DOMAIN}", 200000)),
    ],
    ids=["plain", "whitespace"],
)
def test_parse_last_login(key, value, expected):
    assert parse_last_login(key, value) == expected


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (f"shared/other/a@{DOMAIN}", "100000"),
        (f"shared/last-login/a@{DOMAIN}", "yesterday"),
        (f"shared/last-login/a@{DOMAIN}", "-5"),
        (f"shared/last-login/a@{DOMAIN}", "1.5"),
    ],
    ids=["wrong-prefix", "not-a-number", "negative", "fraction"],
)
def test_parse_last_login_rejects(key, value):
    with pytest.raises(ValueError):
        parse_last_login(key, value)


@pytest.fixture
def account(example_config):
    user = User(example_config.mailboxes_path, f"abcdefghi@{DOMAIN}")
    user.set_password("{SHA512-CRYPT}$6$x$y")
    return user


@pytest.fixture
def lastlogin_socket(example_config, tmp_path, serve_dict):
    return serve_dict(LastLoginDictProxy(example_config), tmp_path / "lastlogin.socket")


@pytest.mark.parametrize(
    ("timestamp", "day"),
    [(100000, 86400), (200000, 172800), (86400, 86400), (0, 0)],
    ids=["100000", "200000", "exact-day", "epoch"],
)
def test_login_timestamp_rounds_down_to_the_day(lastlogin_socket, account, timestamp, day):
    with DictClient(lastlogin_socket) as client:
        assert client.set_values(
            {f"shared/last-login/{account.addr}": str(timestamp)}, account.addr
        )
    assert account.get_last_login_timestamp() == day
    assert int(account.password_path.stat().st_mtime) == day


def test_raw_transaction_lines(lastlogin_socket, account):
    """The exact lines Dovecot 2.3's last_login plugin sends (transaction id 1, user set)."""
    with DictClient(lastlogin_socket) as client:
        client.send(f"B1\t{account.addr}")
        client.send(f"S1\tshared/last-login/{account.addr}\t200000")
        client.send("C1")
        assert client.read_line() == "O1"
    assert account.get_last_login_timestamp() == 172800


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (f"shared/other/abcdefghi@{DOMAIN}", "100000"),
        (f"shared/last-login/abcdefghi@{DOMAIN}", "soon"),
        (f"shared/last-login/../etc@{DOMAIN}", "100000"),
        ("shared/last-login/no-at-sign", "100000"),
    ],
    ids=["wrong-prefix", "bad-timestamp", "traversal", "no-at"],
)
def test_bad_writes_fail_the_commit(lastlogin_socket, account, key, value):
    before = account.get_last_login_timestamp()
    with DictClient(lastlogin_socket) as client:
        assert client.set_values({key: value}) is False
        # the connection keeps working
        assert client.set_values({f"shared/last-login/{account.addr}": "100000"}) is True
    assert before != 86400 and account.get_last_login_timestamp() == 86400


def test_missing_account_logs_error_and_creates_nothing(lastlogin_socket, example_config, caplog):
    addr = f"ghost0000@{DOMAIN}"
    with caplog.at_level(logging.ERROR), DictClient(lastlogin_socket) as client:
        assert client.set_values({f"shared/last-login/{addr}": "100000"}) is True
    assert "no password file" in caplog.text
    assert not (example_config.mailboxes_path / addr).exists()


DOVEADM = shutil.which("doveadm")


@pytest.mark.skipif(DOVEADM is None, reason="doveadm (dovecot-core) not installed")
def test_dovecot_dict_client_sets_last_login(lastlogin_socket, account):
    result = subprocess.run(
        [
            DOVEADM,
            "-O",
            "dict",
            "set",
            f"proxy:{lastlogin_socket}:lastlogin",
            f"shared/last-login/{account.addr}",
            "200000",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert account.get_last_login_timestamp() == 172800


def test_console_script(example_config, account, tmp_path):
    """``lastlogin SOCKET INI`` as its unit runs it."""
    socket_path = tmp_path / "lastlogin.socket"
    exe = Path(sys.executable).parent / "lastlogin"
    proc = subprocess.Popen(
        [str(exe), str(socket_path), str(tmp_path / "chatmail.ini")], stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with DictClient(socket_path) as client:
            assert client.set_values({f"shared/last-login/{account.addr}": "100000"})
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert account.get_last_login_timestamp() == 86400


def test_every_login_is_counted(example_config, account, tmp_path, serve_dict):
    """chatmail_logins_total: the API sums the counters file this writes."""
    counters = Counters(example_config.counters_dir, "lastlogin")
    proxy = LastLoginDictProxy(example_config, counters)
    socket_path = serve_dict(proxy, tmp_path / "counted.socket")
    with DictClient(socket_path) as client:
        for timestamp in (100000, 100001, 200000):
            assert client.set_values({f"shared/last-login/{account.addr}": str(timestamp)})
        assert client.set_values({"shared/last-login/no-at-sign": "1"}) is False
    assert counters.value("logins_total") == 3
    counters.flush()
    totals = read_counters(example_config.counters_dir)
    assert totals["logins_total"] == {(): 3}
