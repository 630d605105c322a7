"""chatmaild.turncreds: the TURN REST credentials behind turn_socket_path, over real sockets."""

from __future__ import annotations

import base64
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chatmaild.turn import get_turn_credentials
from chatmaild.turncreds import (
    CREDENTIALS_LIFETIME_S,
    SecretError,
    listening_socket,
    main,
    make_credentials,
    read_secret,
    serve,
)

SECRET = "9f2c" * 16


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "turn-secret"
    path.write_text(SECRET + "\n")
    return path


def openssl_hmac_sha1_b64(key: str, message: str) -> str:
    """The same HMAC from another implementation (OpenSSL's command line)."""
    out = subprocess.run(
        ["openssl", "dgst", "-sha1", "-hmac", key, "-binary"],
        input=message.encode(),
        capture_output=True,
        check=True,
    ).stdout
    return base64.b64encode(out).decode()


def test_credentials_are_expiry_and_hmac_of_it():
    line = make_credentials(SECRET.encode(), now=1_700_000_000.7, lifetime=3600)
    username, password = line.split(":")
    assert username == "1700003600"
    assert password == openssl_hmac_sha1_b64(SECRET, username)


def test_default_lifetime_is_upstreams_five_days():
    username = make_credentials(SECRET.encode(), now=1000).split(":")[0]
    assert int(username) == 1000 + 5 * 86400 == 1000 + CREDENTIALS_LIFETIME_S


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read"),
        ("", "shorter"),
        ("abc" * 10, "shorter"),
        ("a" * 20 + " " + "b" * 20, "blanks"),
        ("a" * 40 + "\x07", "control"),
        ("ä" * 40, "cannot read"),
    ],
    ids=["missing", "empty", "short", "blank-inside", "control-char", "not-ascii"],
)
def test_unusable_secret_is_refused(tmp_path, content, problem):
    path = tmp_path / "secret"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(SecretError, match=problem):
        read_secret(path)


def test_secret_surrounding_newline_is_not_part_of_it(secret_file):
    assert read_secret(secret_file) == SECRET.encode()


def serve_in_thread(sock: socket.socket, connections: int, **kwargs) -> threading.Thread:
    thread = threading.Thread(
        target=serve,
        args=(sock, SECRET.encode()),
        kwargs={"max_connections": connections, **kwargs},
    )
    thread.start()
    return thread


def test_metadata_client_reads_fresh_credentials_per_connection(sock_dir):
    path = sock_dir / "turn.socket"
    sock = listening_socket(path)
    clock = iter([100.0, 200.0])
    thread = serve_in_thread(sock, 2, lifetime=60, clock=lambda: next(clock))
    first = get_turn_credentials(path)
    second = get_turn_credentials(path)
    thread.join(5)
    sock.close()
    assert first.split(":")[0] == "160" and second.split(":")[0] == "260"
    assert first == make_credentials(SECRET.encode(), 100, 60)


def test_bound_socket_is_owner_and_group_only(sock_dir):
    path = sock_dir / "turn.socket"
    path.write_text("stale")  # what a killed run leaves: replaced, not an error
    with listening_socket(path):
        mode = path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660


def test_a_client_that_hangs_up_at_once_does_not_stop_the_server(sock_dir):
    path = sock_dir / "turn.socket"
    sock = listening_socket(path)
    thread = serve_in_thread(sock, 2)
    rude = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    rude.connect(str(path))
    rude.close()  # RST before the answer
    assert get_turn_credentials(path).count(":") == 1
    thread.join(5)
    sock.close()


def test_socket_activated_process_answers_on_systemds_socket(sock_dir, secret_file):
    """The systemd path for real: fd 3 is the listening socket and LISTEN_PID names the
    process itself (a launcher moves the socket to fd 3, then execs the daemon in place)."""
    path = sock_dir / "activated.socket"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    launcher = (
        "import os, sys;"
        f"os.dup2({listener.fileno()}, 3);"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1');"
        "os.execv(sys.executable, [sys.executable, '-m', 'chatmaild.turncreds', *sys.argv[1:]])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, "--secret-file", str(secret_file)],
        pass_fds=[listener.fileno()],
        stderr=subprocess.PIPE,
    )
    try:
        before = time.time()
        credentials = get_turn_credentials(path)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
        listener.close()
    username, password = credentials.split(":")
    assert abs(int(username) - (before + CREDENTIALS_LIFETIME_S)) < 30
    assert password == openssl_hmac_sha1_b64(SECRET, username)
    assert b"valid for 432000 s" in stderr


def test_main_refuses_a_missing_secret(tmp_path, caplog):
    assert main(["--secret-file", str(tmp_path / "absent"), "--socket", str(tmp_path / "s")]) == 1
    assert "cannot read the TURN secret" in caplog.text
    assert not (tmp_path / "s").exists()


def test_main_refuses_a_nonpositive_lifetime(secret_file, tmp_path):
    assert main(["--secret-file", str(secret_file), "--lifetime", "0"]) == 2


def test_main_without_activation_or_socket_says_so(secret_file, monkeypatch):
    monkeypatch.delenv("LISTEN_PID", raising=False)
    with pytest.raises(SystemExit, match="no --socket"):
        main(["--secret-file", str(secret_file)])


def test_module_is_small():
    source = Path(__file__).resolve().parents[2] / "chatmaild" / "turncreds.py"
    assert len(source.read_text().splitlines()) < 300
