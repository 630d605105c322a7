"""Client-side helpers for a relay running in a container on 127.0.0.1.

Used by the container tests and by ``tests/bench/bench_relay.py``. The relay's certificate
is self-signed (a ``_`` domain), so every TLS connection here is unverified, as Delta Chat
does for ``_`` domains. The relay's domain does not resolve on the host: clients connect to
127.0.0.1 and name the domain only in addresses and HTTP Host headers.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import imaplib
import re
import secrets
import smtplib
import ssl
import string
import sys
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filtermail_support import armor, encrypted_payload

HOST = "127.0.0.1"
ALNUM = string.ascii_lowercase + string.digits


@dataclass(frozen=True)
class Platform:
    """A Debian release and MTA the container tests apply the formula to, and what a client
    sees differently there."""

    id: str
    suite: str
    mta: str

    @property
    def mta_unit(self) -> str:
        """The MTA's systemd unit, as the control API names its check (service.<unit>)."""
        return self.mta

    @property
    def filter_unit(self) -> str:
        """The unit that reads chatmail.ini for mail filtering: OpenSMTPD runs filtermail's
        rules as its own filter process."""
        return "filtermail.service" if self.mta == "postfix" else "opensmtpd.service"

    @property
    def sender_mismatch_code(self) -> int:
        """MAIL FROM other than the login: Postfix refuses the recipient (553), OpenSMTPD's
        `senders` check the sender (530)."""
        return 553 if self.mta == "postfix" else 530

    @property
    def dkim_signature_delivered(self) -> bool:
        """Postfix removes our DKIM signature at final delivery; filter-dkimsign signs on the
        listener, before smtpd knows whether the recipient is local."""
        return self.mta == "opensmtpd"


PLATFORMS = (
    Platform(id="debian12-postfix", suite="bookworm", mta="postfix"),
    Platform(id="debian13-postfix", suite="trixie", mta="postfix"),
    Platform(id="debian13-opensmtpd", suite="trixie", mta="opensmtpd"),
)


def unverified_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def message_id(domain: str) -> str:
    return f"<{secrets.token_hex(12)}@{domain}>"


def encrypted_mail(from_addr: str, to_addrs: list[str], msgid: str, size: int = 4000) -> bytes:
    """An OpenPGP/MIME message (PKESK + SEIPD packets, armored) shaped like Delta Chat's."""
    payload = armor(encrypted_payload(size))
    return (
        f"From: <{from_addr}>\r\nTo: {', '.join(f'<{a}>' for a in to_addrs)}\r\n"
        f"Subject: ...\r\nDate: {email.utils.formatdate()}\r\nMessage-ID: {msgid}\r\n"
        "Chat-Version: 1.0\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n'
        ' boundary="e2eB0undary"\r\n\r\n'
        "--e2eB0undary\r\nContent-Type: application/pgp-encrypted\r\n"
        "Content-Description: PGP/MIME version identification\r\n\r\nVersion: 1\r\n\r\n"
        '--e2eB0undary\r\nContent-Type: application/octet-stream; name="encrypted.asc"\r\n'
        "Content-Description: OpenPGP encrypted message\r\n"
        'Content-Disposition: inline; filename="encrypted.asc";\r\n\r\n'
        f"{payload}\r\n--e2eB0undary--\r\n"
    ).encode()


def plain_mail(from_addr: str, to_addrs: list[str], msgid: str) -> bytes:
    return (
        f"From: <{from_addr}>\r\nTo: {', '.join(f'<{a}>' for a in to_addrs)}\r\n"
        f"Subject: hello\r\nDate: {email.utils.formatdate()}\r\nMessage-ID: {msgid}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "not encrypted\r\n"
    ).encode()


class RelayClient:
    def __init__(self, container, domain: str, platform: Platform = PLATFORMS[0]):
        self.container = container
        self.domain = domain
        self.platform = platform

    # accounts

    def gencreds(self) -> tuple[str, str]:
        """A fresh address and password that satisfy the relay's default account rules."""
        user = "".join(secrets.choice(ALNUM) for _ in range(9))
        return f"{user}@{self.domain}", "".join(secrets.choice(ALNUM) for _ in range(16))

    def new_account(self) -> tuple[str, str]:
        """An account created by its first IMAP login."""
        addr, password = self.gencreds()
        with self.imap(addr, password):
            pass
        return addr, password

    def mailbox_dir(self, addr: str) -> str:
        return f"/home/vmail/mail/{self.domain}/{addr}"

    def account_exists(self, addr: str) -> bool:
        return (
            self.container.run(["test", "-d", self.mailbox_dir(addr)], check=False).returncode == 0
        )

    # IMAP

    @contextmanager
    def imap(self, addr: str, password: str, port: int = 993):
        conn = imaplib.IMAP4_SSL(HOST, port, ssl_context=unverified_context(), timeout=30)
        try:
            conn.login(addr, password)
            yield conn
        finally:
            try:
                conn.logout()
            except (imaplib.IMAP4.error, OSError):
                pass

    def fetch_inbox_message(
        self, addr: str, password: str, msgid: str, timeout: float = 30, poll: float = 0.3
    ) -> bytes:
        """The raw message with this Message-ID, waiting for it to arrive in INBOX."""
        deadline = time.monotonic() + timeout
        with self.imap(addr, password) as conn:
            while True:
                conn.select("INBOX")
                _, data = conn.search(None, "HEADER", "Message-ID", msgid)
                ids = data[0].split()
                if ids:
                    _, fetched = conn.fetch(ids[-1], "(RFC822)")
                    return fetched[0][1]
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{msgid} did not arrive in {addr}'s INBOX in {timeout} s")
                time.sleep(poll)

    # SMTP

    def smtp(self, port: int, addr: str | None = None, password: str | None = None) -> smtplib.SMTP:
        """A connection to 25/587 (STARTTLS) or 465 (implicit TLS), logged in if asked."""
        ctx = unverified_context()
        if port == 465:
            conn = smtplib.SMTP_SSL(HOST, port, context=ctx, timeout=30)
        else:
            conn = smtplib.SMTP(HOST, port, timeout=30)
            conn.starttls(context=ctx)
        if addr is not None:
            conn.login(addr, password)
        return conn

    def send(
        self,
        port: int,
        addr: str,
        password: str,
        to_addrs: list[str],
        msg: bytes,
        mail_from: str | None = None,
    ) -> None:
        with self.smtp(port, addr, password) as conn:
            conn.sendmail(mail_from or addr, to_addrs, msg)

    # HTTPS through port 443 (nginx stream, ALPN routing)

    def https_get(self, path: str, host: str | None = None, method: str = "GET"):
        conn = http.client.HTTPSConnection(HOST, 443, context=unverified_context(), timeout=30)
        try:
            conn.request(method, path, headers={"Host": host or self.domain})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    # the relay's resolver

    def publish_txt(self, name: str, value: str) -> None:
        """A TXT record in the relay's unbound (split into 255-byte strings)."""
        chunks = " ".join(f'"{value[i : i + 255]}"' for i in range(0, len(value), 255))
        self.local_data(f"{name}. 300 IN TXT {chunks}")

    def local_data(self, record: str) -> None:
        res = self.container.run(["unbound-control", "local_data", record])
        assert res.stdout.strip() == "ok", res.stdout

    # the relay's DKIM key and outgoing queue

    def dkim_public_txt(self, selector: str = "opendkim") -> str:
        text = self.container.read_file(f"/etc/dkimkeys/{selector}.txt")
        return "".join(re.findall(r'"([^"]*)"', text))

    def queued_message(self, recipient: str, timeout: float = 30) -> tuple[str, bytes]:
        """(queue id, raw message) of the queued mail to ``recipient`` (deferred remote mail)."""
        if self.platform.mta == "opensmtpd":
            return self._smtpd_queued_message(recipient, timeout)
        deadline = time.monotonic() + timeout
        while True:
            out = self.container.run(["postqueue", "-j"]).stdout
            for line in out.splitlines():
                if f'"address": "{recipient}"' in line or f'"address":"{recipient}"' in line:
                    queue_id = re.search(r'"queue_id": ?"([^"]+)"', line).group(1)
                    raw = self.container.run(
                        ["postcat", "-h", "-b", "-q", queue_id], text=False
                    ).stdout
                    return queue_id, raw
            if time.monotonic() > deadline:
                raise TimeoutError(f"no queued mail to {recipient}: {out[-2000:]}")
            time.sleep(0.5)

    def _smtpd_queued_message(self, recipient: str, timeout: float) -> tuple[str, bytes]:
        # `smtpctl show queue`: one envelope per line, "|"-separated, the envelope id first;
        # its first 8 hex digits are the message id, the message sits unencrypted in the
        # queue directory (smtpd.conf sets no queue encryption).
        deadline = time.monotonic() + timeout
        while True:
            out = self.container.run(["smtpctl", "show", "queue"]).stdout
            for line in out.splitlines():
                if f"|{recipient}|" in line:
                    msgid = line.split("|", 1)[0][:8]
                    path = f"/var/spool/smtpd/queue/{msgid[:2]}/{msgid}/message"
                    raw = self.container.run(["cat", path], text=False).stdout
                    return msgid, raw
            if time.monotonic() > deadline:
                raise TimeoutError(f"no queued mail to {recipient}: {out[-2000:]}")
            time.sleep(0.5)

    def delete_queued(self, queue_id: str) -> None:
        if self.platform.mta == "opensmtpd":
            self.container.run(["smtpctl", "remove", queue_id], check=False)
        else:
            self.container.run(["postsuper", "-d", queue_id], check=False)


def dkim_keypair() -> tuple[bytes, str]:
    """(PEM private key, base64 DER public key for a DKIM TXT ``p=``), RSA 2048."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem, base64.b64encode(der).decode()


# --- Delta Chat (deltachat-rpc-server from the test venv) ---------------------------------


def dclogin_qr(addr: str, password: str) -> str:
    """A dclogin: code for the relay on 127.0.0.1 (no DNS, self-signed certificate)."""
    return (
        f"dclogin:{addr}?p={urllib.parse.quote(password, safe='')}&v=1&ih={HOST}&ip=993&is=ssl"
        f"&sh={HOST}&sp=465&ss=ssl&ic=3"
    )


def start_rpc(accounts_dir: Path):
    """A started deltachat-rpc-server client; call ``.close()`` when done."""
    from deltachat_rpc_client import Rpc

    server = Path(sys.executable).parent / "deltachat-rpc-server"
    rpc = Rpc(
        accounts_dir=str(accounts_dir),
        rpc_server_path=str(server) if server.exists() else "deltachat-rpc-server",
    )
    rpc.start()
    return rpc


def online_account(deltachat, relay: RelayClient, addr: str = "", password: str = ""):
    """A Delta Chat profile configured for an account on the relay (a fresh one unless
    given), online."""
    if not addr:
        addr, password = relay.gencreds()
    account = deltachat.add_account()
    account.add_transport_from_qr(dclogin_qr(addr, password))
    account.set_config("bcc_self", "0")
    account.bring_online()
    account.addr = addr
    return account


def ping_pong(ac1, ac2, chat12, chat21, text: str) -> float:
    """Seconds for ac1 -> ac2 and back, each side waiting for the other's message."""
    started = time.monotonic()
    chat12.send_text(f"ping {text}")
    got = ac2.wait_for_incoming_msg().get_snapshot()
    assert got.text == f"ping {text}", got.text
    chat21.send_text(f"pong {text}")
    got = ac1.wait_for_incoming_msg().get_snapshot()
    assert got.text == f"pong {text}", got.text
    return time.monotonic() - started


#: Seconds between timed ping-pong rounds. Delta Chat lets a profile send 3 messages per 3 s
#: (a token bucket: `ratelimit` in core's context.rs, for every server since core 2.29);
#: once it is full, the SMTP loop sleeps after each send until one more would fit (up to
#: 1 s, not woken by a new message: `smtp_loop` in core's scheduler.rs) and the next message
#: waits out that sleep. Back-to-back rounds send once per round trip per profile, so they
#: measure that limit (~1 s a round) instead of the relay; with this pause neither profile
#: sends more than once a second.
ROUND_PAUSE = 1.2


def ping_pong_rounds(ac1, ac2, chat12, chat21, rounds: int) -> list[float]:
    """Seconds of ``rounds`` ping-pongs, ROUND_PAUSE apart, after an untimed warm-up round
    (keys exchanged, connections up)."""
    ping_pong(ac1, ac2, chat12, chat21, "warm-up")
    times = []
    for i in range(rounds):
        time.sleep(ROUND_PAUSE)
        times.append(ping_pong(ac1, ac2, chat12, chat21, str(i)))
    return times
