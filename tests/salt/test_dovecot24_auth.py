"""Dovecot 2.4's Lua passdb/userdb (auth-doveauth.lua) against a real doveauth.

Dovecot 2.4 dropped the dict passdb the 2.3 template uses, so on Debian 13 the formula
installs a Lua script that speaks doveauth's dict protocol over its UNIX socket. Here the
script runs under lua5.4 + luasocket (as in Dovecot's auth process) with Dovecot's Lua API
stood in by tests/salt/lua_auth_harness.lua, against doveauth started as its own process.
"""

from __future__ import annotations

import os
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatmaild.accounts import verify_password
from chatmaild.dictproxy import Lookup, parse_request
from chatmaild.doveauth import parse_passdb_key

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


def lua(socket_path: Path, mode: str, user: str, password: str | None = None) -> dict:
    """Run the script's passdb (with ``password``) or userdb lookup of ``user``."""
    args = [mode, user] if password is None else [mode, user, password.encode().hex()]
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
            stored, plain_hex = rest
            parsed["verify"].append((stored, bytes.fromhex(plain_hex).decode()))
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


# -- the password travels encoded: no TAB, CR, LF or NUL can start a second request ----

INJECTION_PASSWORDS = {
    "tab": "pass\tword12",
    "lf-second-request": f'pass\nLshared/passdb/victimpw1"victim000@{DOMAIN}\tx',
    "cr-lf": "pass\r\nword12",
    "soh-like-escapes": "pw\x01t\x01n\x010\x011\x01",
    "quotes-backslashes": 'q"u\'o\\te\\"\\\\12',
    "all-at-once": "\t\n\r\x01\"'\\x\x010\\\t\n",
}


@pytest.mark.parametrize("password", INJECTION_PASSWORDS.values(), ids=INJECTION_PASSWORDS.keys())
def test_control_characters_log_in_as_themselves(doveauth_socket, gencreds, password):
    """Created with exactly the password typed, and the same password opens it again."""
    socket_path, config = doveauth_socket
    localpart, _ = gencreds()
    addr = f"{localpart}@{DOMAIN}"
    for _ in range(2):  # create, then log in to the existing account
        login = lua(socket_path, "passdb", addr, password)
        assert login["result"] == "OK", login
        [(stored, plain)] = login["verify"]
        assert plain == password
        assert verify_password(password, stored)
    assert sorted(os.listdir(config.mailboxes_path)) == [addr]  # no victim000 account


def test_nul_in_a_password_fails_without_an_account(doveauth_socket, gencreds):
    socket_path, config = doveauth_socket
    localpart, _ = gencreds()
    login = lua(socket_path, "passdb", f"{localpart}@{DOMAIN}", "nul\0password1")
    assert login["result"] == "INTERNAL_FAILURE"  # crypt(3) cannot hash NUL: doveauth F
    assert os.listdir(config.mailboxes_path) == []


class RecordingDict(socketserver.ThreadingUnixStreamServer):
    """A dict server that records every request line and answers lookups "N"."""

    daemon_threads = True

    def __init__(self, path: Path):
        self.lines: list[bytes] = []
        server = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for line in self.rfile:
                    server.lines.append(line)
                    if line.startswith(b"L"):
                        self.wfile.write(b"N\n")

        super().__init__(str(path), Handler)


@pytest.fixture(scope="module")
def recording_dict():
    with (
        tempfile.TemporaryDirectory(prefix="cm-") as tmp,
        RecordingDict(Path(tmp) / "dict.socket") as server,
    ):
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        yield server
        server.shutdown()


def sent_lookups(server: RecordingDict, user: str, password: str) -> list[bytes]:
    server.lines.clear()
    result = lua(Path(server.server_address), "passdb", user, password)
    assert result["result"] == "USER_UNKNOWN", result
    return list(server.lines)


@pytest.mark.parametrize("password", INJECTION_PASSWORDS.values(), ids=INJECTION_PASSWORDS.keys())
def test_one_login_is_one_request(recording_dict, password):
    user = f"abcdefghi@{DOMAIN}"
    hello, lookup = sent_lookups(recording_dict, user, password)
    assert hello == b"H3\t2\t0\t\tauth\n"
    request = parse_request(lookup.rstrip(b"\n").decode())
    assert isinstance(request, Lookup) and request.user == user
    assert parse_passdb_key(request.key.removeprefix("shared/passdb/")) == (password, user)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(password=st.text(st.characters(exclude_categories=("Cs",)), max_size=40))
def test_any_password_round_trips_through_the_encoding(recording_dict, password):
    """Whatever the password, doveauth decodes exactly it from exactly one request line,
    the way it decodes what Dovecot 2.3's own dict client sends."""
    user = f"abcdefghi@{DOMAIN}"
    lines = sent_lookups(recording_dict, user, password)
    assert len(lines) == 2 and all(line.count(b"\n") == 1 for line in lines)
    request = parse_request(lines[1].rstrip(b"\n").decode())
    assert parse_passdb_key(request.key.removeprefix("shared/passdb/")) == (password, user)
