"""chatmail-turn-credentials: time-limited TURN credentials on a UNIX socket.

coturn runs with ``use-auth-secret``, the TURN REST scheme (draft-uberti-behave-turn-rest):
it accepts a username that is a Unix time still in the future, with the password
base64(HMAC-SHA1(secret, username)). This daemon holds the same secret and answers every
connection on its socket with one line ``<expiry>:<password>``: what chatmail-metadata's
TURN client (:mod:`chatmaild.turn`) reads and hands to Delta Chat as
``<host>:3478:<expiry>:<password>``, as upstream's chatmail-turn does. The username is
the bare timestamp: Delta Chat parses that field as an integer (when to fetch new
credentials), so it cannot carry an account name as well.

The socket normally comes from systemd: a .socket unit creates it with the owner and mode
that let only the metadata daemon connect, and this process runs as a dynamic user that
can do nothing but answer. Without socket activation (tests, other service managers) it
binds the ``--socket`` path itself.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: Upstream chatmail-turn's lifetime. Delta Chat asks again when less than 12 h are left.
CREDENTIALS_LIFETIME_S = 5 * 86400
#: coturn reads the secret from a config line: printable ASCII without blanks, and long
#: enough that guessing it is hopeless.
MIN_SECRET_LEN = 32
#: systemd passes socket-activated descriptors from 3 on (sd_listen_fds(3)).
SD_LISTEN_FDS_START = 3
#: A client that never reads its line must not hold up the next one.
SEND_TIMEOUT_S = 1.0


class SecretError(ValueError):
    """The shared secret file is missing, empty or not usable in coturn's config."""


def read_secret(path: Path) -> bytes:
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretError(f"cannot read the TURN secret {path}: {exc}") from None
    if len(text) < MIN_SECRET_LEN:
        raise SecretError(f"TURN secret {path} is shorter than {MIN_SECRET_LEN} characters")
    if not all(c.isprintable() and not c.isspace() for c in text):
        raise SecretError(f"TURN secret {path} has blanks or control characters")
    return text.encode("ascii")


def make_credentials(secret: bytes, now: float, lifetime: int = CREDENTIALS_LIFETIME_S) -> str:
    """``<expiry>:<password>`` for the TURN REST scheme."""
    username = str(int(now) + lifetime)
    digest = hmac.new(secret, username.encode("ascii"), hashlib.sha1).digest()
    return f"{username}:{base64.b64encode(digest).decode('ascii')}"


def listening_socket(path: Path | None) -> socket.socket:
    """systemd's socket if this process was socket-activated, else one bound at ``path``."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and int(os.environ.get("LISTEN_FDS", "0")):
        return socket.socket(fileno=SD_LISTEN_FDS_START)
    if path is None:
        raise SystemExit("chatmail-turn-credentials: not socket-activated and no --socket given")
    path.unlink(missing_ok=True)  # a stale socket of an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # 0660: the owner and its group only
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(64)
    return sock


def serve(
    sock: socket.socket,
    secret: bytes,
    lifetime: int = CREDENTIALS_LIFETIME_S,
    clock: Callable[[], float] = time.time,
    max_connections: int | None = None,
) -> None:
    """Answer each connection with one credentials line (``max_connections``: for tests)."""
    served = 0
    while max_connections is None or served < max_connections:
        conn, _ = sock.accept()
        served += 1
        with conn:
            conn.settimeout(SEND_TIMEOUT_S)
            try:
                conn.sendall(make_credentials(secret, clock(), lifetime).encode() + b"\n")
            except OSError as exc:
                log.warning("could not send TURN credentials: %s", exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chatmail-turn-credentials",
        description="hand out time-limited TURN credentials on a UNIX socket",
    )
    parser.add_argument("--secret-file", type=Path, required=True, help="coturn's auth secret")
    parser.add_argument("--socket", type=Path, help="path to bind without socket activation")
    parser.add_argument("--lifetime", type=int, default=CREDENTIALS_LIFETIME_S, help="seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.lifetime <= 0:
        log.error("--lifetime must be positive, not %d", args.lifetime)
        return 2
    try:
        secret = read_secret(args.secret_file)
    except SecretError as exc:
        log.error("%s", exc)
        return 1
    sock = listening_socket(args.socket)
    log.info("handing out TURN credentials valid for %d s", args.lifetime)
    serve(sock, secret, args.lifetime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
