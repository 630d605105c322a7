"""End-to-end probe: the relay delivers a message from its probe account to itself.

The message goes in like any client's (submission 587, STARTTLS, SASL) and so passes
filtermail's outgoing check, Postfix and LMTP; it is read back over IMAPS 993 and
deleted. It is OpenPGP/MIME shaped (RFC 3156 with a PKESK + SEIPD packet sequence) so
filtermail accepts it; its payload is random bytes, nobody can or needs to decrypt it.

The probe account is an ordinary account (created by its first login) with a ``ci-``
localpart, so fsreport-style metrics count it as a test account. Its credentials live in
the API's state directory, readable only by the API user.
"""

from __future__ import annotations

import asyncio
import base64
import imaplib
import json
import secrets
import smtplib
import ssl
import string
import time
from datetime import UTC, datetime
from email.utils import format_datetime

from chatmaild.config import Config
from chatmaild.fileio import write_text_atomic

from .models import ProbeResult
from .settings import Settings

POLL_INTERVAL_S = 0.5


def _packet(tag: int, body: bytes) -> bytes:
    """A new-format OpenPGP packet with a one-octet length (bodies < 192 bytes)."""
    return bytes([0xC0 | tag, len(body)]) + body


def build_probe_message(addr: str, message_id: str) -> bytes:
    pkesk = _packet(1, bytes([3]) + secrets.token_bytes(8) + bytes([1]) + secrets.token_bytes(64))
    seipd = _packet(18, bytes([1]) + secrets.token_bytes(120))
    encoded = base64.b64encode(pkesk + seipd).decode()
    armored = "\r\n".join(
        ["-----BEGIN PGP MESSAGE-----", ""]
        + [encoded[i : i + 76] for i in range(0, len(encoded), 76)]
        + ["-----END PGP MESSAGE-----", ""]
    )
    boundary = secrets.token_hex(12)
    lines = [
        f"From: <{addr}>",
        f"To: <{addr}>",
        "Subject: [...]",
        f"Date: {format_datetime(datetime.now(UTC))}",
        f"Message-ID: <{message_id}>",
        "MIME-Version: 1.0",
        (
            'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
            f'boundary="{boundary}"'
        ),
        "",
        f"--{boundary}",
        "Content-Type: application/pgp-encrypted",
        "",
        "Version: 1",
        "",
        f"--{boundary}",
        'Content-Type: application/octet-stream; name="encrypted.asc"',
        "",
        armored,
        f"--{boundary}--",
        "",
    ]
    return "\r\n".join(lines).encode()


def load_or_create_credentials(settings: Settings, config: Config) -> tuple[str, str]:
    path = settings.probe_credentials_path
    try:
        data = json.loads(path.read_text())
        if data.get("domain") == config.address_domain:
            return data["email"], data["password"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    alphabet = string.ascii_lowercase + string.digits
    length = max(config.username_min_length, min(config.username_max_length, 12)) - 3
    localpart = "ci-" + "".join(secrets.choice(alphabet) for _ in range(max(length, 1)))
    email = f"{localpart}@{config.address_domain}"
    password = secrets.token_urlsafe(max(24, config.password_min_length))
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"email": email, "password": password, "domain": config.address_domain}
    write_text_atomic(path, json.dumps(body), mode=0o600)
    return email, password


def _tls_context(verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _submit(settings: Settings, email: str, password: str, message: bytes) -> None:
    p = settings.probe
    with smtplib.SMTP(p.host, p.submission_port, timeout=p.timeout_s) as smtp:
        smtp.starttls(context=_tls_context(p.verify_tls))
        smtp.login(email, password)
        smtp.sendmail(email, [email], message)


def _fetch_and_delete(settings: Settings, email: str, password: str, message_id: str, deadline):
    """Poll INBOX for the message; delete it (and older probes) once seen."""
    p = settings.probe
    imap = imaplib.IMAP4_SSL(
        p.host, p.imap_port, ssl_context=_tls_context(p.verify_tls), timeout=p.timeout_s
    )
    try:
        imap.login(email, password)
        while True:
            imap.select("INBOX")
            _, data = imap.search(None, "HEADER", "Message-ID", message_id)
            if data and data[0].split():
                _, everything = imap.search(None, "ALL")
                for number in everything[0].split():
                    imap.store(number, "+FLAGS", "\\Deleted")
                imap.expunge()
                return
            if time.monotonic() > deadline:
                raise TimeoutError("message not in INBOX before the probe timeout")
            time.sleep(POLL_INTERVAL_S)
    finally:
        try:
            imap.logout()
        except (OSError, imaplib.IMAP4.error):
            pass


#: How a probe whose submission login was refused ends (probe_once's detail).
LOGIN_REFUSED = "SMTPAuthenticationError"


def unprovable(result: ProbeResult, config: Config) -> bool:
    """A refused probe login while account creation is closed: the probe account is an
    ordinary one, made by its first login, so it cannot exist until creation re-opens (an
    adopted relay that had it closed, say). The operator's choice, not a broken relay."""
    return not result.ok and LOGIN_REFUSED in result.detail and config.nocreate_file.exists()


def probe_once(settings: Settings, config: Config) -> ProbeResult:
    started_at = datetime.now(UTC)
    started = time.monotonic()
    deadline = started + settings.probe.timeout_s
    stage = "credentials"
    try:
        email, password = load_or_create_credentials(settings, config)
        message_id = f"probe-{secrets.token_hex(8)}@{config.address_domain}"
        stage = f"submission {settings.probe.host}:{settings.probe.submission_port}"
        _submit(settings, email, password, build_probe_message(email, message_id))
        stage = f"imaps {settings.probe.host}:{settings.probe.imap_port}"
        _fetch_and_delete(settings, email, password, message_id, deadline)
    except (OSError, smtplib.SMTPException, imaplib.IMAP4.error, TimeoutError) as exc:
        return ProbeResult(
            ok=False,
            started_at=started_at,
            duration_s=round(time.monotonic() - started, 3),
            detail=f"{stage}: {type(exc).__name__}: {exc}"[:300],
        )
    return ProbeResult(
        ok=True,
        started_at=started_at,
        duration_s=round(time.monotonic() - started, 3),
        detail="submitted on 587, read back and deleted over IMAPS",
    )


async def run_probe(settings: Settings, config: Config) -> ProbeResult:
    return await asyncio.to_thread(probe_once, settings, config)
