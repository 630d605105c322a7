"""Client for chatmail-turn's credential socket.

chatmail-turn (an external binary serving STUN/TURN on UDP 3478) hands out short-lived
credentials: connect to its UNIX socket and read one line ``user:pass``.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

TURN_TIMEOUT_S = 5.0
MAX_CREDENTIALS_LEN = 1024


class TurnError(RuntimeError):
    """chatmail-turn answered with something that is not ``user:pass``."""


def get_turn_credentials(socket_path: str | Path, timeout: float = TURN_TIMEOUT_S) -> str:
    """Return ``user:pass`` from chatmail-turn.

    Raises OSError (``TimeoutError``, ``FileNotFoundError``, ``ConnectionRefusedError``)
    when the server is absent or slower than ``timeout`` in total, TurnError for a
    malformed answer. The bound matters: an IMAP client's GETMETADATA waits on it.
    """
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        data = b""
        while b"\n" not in data and len(data) <= MAX_CREDENTIALS_LEN:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("TURN server did not send a full line in time")
            sock.settimeout(remaining)
            chunk = sock.recv(MAX_CREDENTIALS_LEN)
            if not chunk:
                break
            data += chunk
    line = data.split(b"\n", 1)[0].strip()
    try:
        credentials = line.decode("ascii")
    except UnicodeDecodeError:
        raise TurnError("TURN credentials are not ASCII") from None
    user, sep, password = credentials.partition(":")
    if not sep or not user or not password or any(c.isspace() for c in credentials):
        raise TurnError(f"TURN server sent no 'user:pass' line ({len(line)} bytes)")
    return credentials
