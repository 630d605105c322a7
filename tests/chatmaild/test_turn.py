"""chatmaild.turn against real UNIX-socket servers."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from chatmaild.turn import TurnError, get_turn_credentials


def serve_once(path: Path, payload: bytes | None, delay: float = 0.0) -> threading.Thread:
    """Accept one connection, optionally wait, send ``payload`` (None: never answer)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def run():
        with server:
            conn, _ = server.accept()
            with conn:
                time.sleep(delay)
                if payload is None:
                    conn.recv(1)  # blocks until the client gives up and closes
                    return
                conn.sendall(payload)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_success(sock_dir):
    path = sock_dir / "turn.socket"
    serve_once(path, b"testuser:testpass\n")
    assert get_turn_credentials(path) == "testuser:testpass"


def test_line_without_newline_then_close(sock_dir):
    path = sock_dir / "turn.socket"
    serve_once(path, b"u1:p1")
    assert get_turn_credentials(path) == "u1:p1"


def test_missing_socket(sock_dir):
    with pytest.raises(FileNotFoundError):
        get_turn_credentials(sock_dir / "absent.socket")


def test_socket_without_listener(sock_dir):
    path = sock_dir / "stale.socket"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed chatmail-turn leaves
    with pytest.raises(ConnectionRefusedError):
        get_turn_credentials(path)


@pytest.mark.parametrize(
    ("timeout", "low", "high"),
    [({"timeout": 0.5}, 0.4, 3), ({}, 4.5, 8)],
    ids=["given-timeout", "default-five-seconds"],
)
def test_server_that_never_accepts_times_out(sock_dir, timeout, low, high):
    path = sock_dir / "turn.socket"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)  # connect() succeeds into the backlog, nothing is ever sent
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            get_turn_credentials(path, **timeout)
        assert low < time.monotonic() - started < high
    finally:
        server.close()


def test_trickling_server_bounded_by_total_timeout(sock_dir):
    path = sock_dir / "turn.socket"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    stop = threading.Event()

    def trickle():
        conn, _ = server.accept()
        with conn:
            while not stop.wait(0.1):
                try:
                    conn.sendall(b"a")
                except OSError:
                    return

    threading.Thread(target=trickle, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises((TimeoutError, TurnError)):
            get_turn_credentials(path, timeout=0.6)
        assert time.monotonic() - started < 2
    finally:
        stop.set()
        server.close()


@pytest.mark.parametrize(
    "payload",
    [b"\n", b"nocolon\n", b":pass\n", b"user:\n", b"us er:pass\n", b"\xff\xfe:x\n"],
    ids=["empty", "no-colon", "no-user", "no-pass", "space", "not-ascii"],
)
def test_malformed_answer(sock_dir, payload):
    path = sock_dir / "turn.socket"
    serve_once(path, payload)
    with pytest.raises(TurnError):
        get_turn_credentials(path)
