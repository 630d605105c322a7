"""Helpers shared by the API tests (imported as a plain module, like filtermail_support)."""

from __future__ import annotations

import datetime as dt
import socket
import threading
from pathlib import Path

from chatmaild import adminctl

MONITOR_TOKEN = "monitor-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789ab"
MONITOR = {"Authorization": f"Bearer {MONITOR_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def make_cert(path: Path, days: float, names: list[str], key_path: Path | None = None) -> Path:
    """A self-signed certificate valid for ``days`` more days (negative: expired)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key_path is not None:
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def checks_by_id(status: dict) -> dict:
    """The checks of a /status body, by check id."""
    return {c["id"]: c for c in status["checks"]}


def serve_adminctl(config, path: Path, scope: str = "accounts") -> socket.socket:
    """A stand-in for systemd's Accept=yes socket: each connection is served once."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(16)

    def loop():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as rfile, conn.makefile("wb") as wfile:
                adminctl.serve_one(config, scope, "postfix", rfile, wfile)

    threading.Thread(target=loop, daemon=True).start()
    return server
