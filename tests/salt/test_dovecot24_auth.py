"""Dovecot 2.4's Lua passdb/userdb (auth-doveauth.lua) against a real doveauth.

Dovecot 2.4 dropped the dict passdb the 2.3 template uses, so on Debian 13 the formula
installs a Lua script that speaks doveauth's dict protocol over its UNIX socket. Here the
script runs under lua5.4 + luasocket (as in Dovecot's auth process) with Dovecot's Lua API
stood in by tests/salt/lua_auth_harness.lua, against doveauth started as its own process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatmaild.accounts import verify_password

HERE = Path(__file__).parent
SCRIPT = HERE.parents[1] / "salt" / "chatmail" / "dovecot" / "files" / "auth-doveauth.lua"
HARNESS = HERE / "lua_auth_harness.lua"
DOMAIN = "chat.example.org"


@pytest.fixture
def doveauth_socket(make_relaxed_config, tmp_path):
    config = make_relaxed_config(DOMAIN)
    socket_path = tmp_path / "doveauth.socket"
    doveauth = Path(sys.executable).parent / "doveauth"
    proc = subprocess.Popen(
        [str(doveauth), str(socket_path), str(tmp_path / "chatmail.ini")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not socket_path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "doveauth did not create its socket"
        time.sleep(0.05)
    yield socket_path, config
    proc.terminate()
    proc.wait(timeout=10)


def lua(socket_path: Path, *args: str) -> dict:
    result = subprocess.run(
        ["lua5.4", str(HARNESS), str(SCRIPT), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "CHATMAIL_DOVEAUTH_SOCKET": str(socket_path)},
    )
    assert result.returncode == 0, result.stderr
    parsed: dict = {"verify": [], "fields": {}}
    for line in result.stdout.splitlines():
        kind, *rest = line.split("\t")
        if kind == "VERIFY":
            parsed["verify"].append(tuple(rest))
        elif kind == "RESULT":
            parsed["result"], parsed["message"] = rest
        elif kind == "FIELD":
            parsed["fields"][rest[0]] = rest[1]
    return parsed


def test_lua_script_is_valid_lua():
    assert subprocess.run(["luac5.4", "-p", str(SCRIPT)], check=False).returncode == 0


@pytest.mark.parametrize(
    "password", ["plainpassword1", "quo\"te\\back'slash pw"], ids=["plain", "escapes"]
)
def test_first_login_creates_then_userdb_finds(doveauth_socket, gencreds, password):
    socket_path, config = doveauth_socket
    localpart, _ = gencreds()
    addr = f"{localpart}@{DOMAIN}"

    login = lua(socket_path, "passdb", addr, password)
    assert login["result"] == "OK", login
    [(stored, plain)] = login["verify"]
    assert plain == password
    assert verify_password(password, stored)
    assert (config.mailboxes_path / addr / "password").exists()

    user = lua(socket_path, "userdb", addr)
    assert user["result"] == "OK"
    assert user["fields"] == {
        "home": str(config.mailboxes_path / addr),
        "uid": "vmail",
        "gid": "vmail",
    }


def test_unknown_users_and_foreign_domains(doveauth_socket, gencreds):
    socket_path, _ = doveauth_socket
    localpart, password = gencreds()
    assert lua(socket_path, "userdb", f"{localpart}@{DOMAIN}")["result"] == "USER_UNKNOWN"
    foreign = lua(socket_path, "passdb", f"{localpart}@elsewhere.example", password)
    assert foreign["result"] == "USER_UNKNOWN"
    assert foreign["verify"] == []


def test_too_short_password_creates_nothing(doveauth_socket, gencreds):
    socket_path, config = doveauth_socket
    localpart, _ = gencreds()
    addr = f"{localpart}@{DOMAIN}"
    assert lua(socket_path, "passdb", addr, "short")["result"] == "USER_UNKNOWN"
    assert not (config.mailboxes_path / addr / "password").exists()


def test_doveauth_down_is_an_internal_failure(tmp_path):
    result = lua(tmp_path / "missing.socket", "passdb", f"abcdefghi@{DOMAIN}", "whatever12")
    assert result["result"] == "INTERNAL_FAILURE"
