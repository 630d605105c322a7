"""Clients of the lab's relays: IMAP/SMTP accounts from the host, SMTP between relays from
inside a relay, Delta Chat in the lab's client namespace, and the MTAs' logs and queues.

The host reaches every lab address (198.18.0.1 is on the bridge), so IMAP/SMTP accounts
connect from it. A relay-to-relay SMTP session runs inside the sending relay, from its
address. Delta Chat runs in ``lab.CLIENT_NETNS``: it resolves the relays' names through
the lab DNS and reaches them at their lab addresses.
"""

from __future__ import annotations

import http.client
import imaplib
import json
import secrets
import smtplib
import string
import sys
import time
import urllib.parse
from contextlib import contextmanager
from pathlib import Path

import dkim
import lab as labctl
from relayclient import unverified_context

ALNUM = string.ascii_lowercase + string.digits
SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id", b"content-type"]


class Account:
    """A mail account on a lab relay, created by its first IMAP login from the host."""

    def __init__(self, relay: labctl.RelaySpec, user: str = ""):
        self.relay = relay
        user = user or "".join(secrets.choice(ALNUM) for _ in range(9))
        self.addr = f"{user}@{relay.address_domain}"
        self.password = "".join(secrets.choice(ALNUM) for _ in range(20))

    @contextmanager
    def imap(self):
        conn = imaplib.IMAP4_SSL(
            self.relay.address, 993, ssl_context=unverified_context(), timeout=30
        )
        try:
            conn.login(self.addr, self.password)
            yield conn
        finally:
            try:
                conn.logout()
            except (imaplib.IMAP4.error, OSError):
                pass

    def send(self, to_addrs: list[str], msg: bytes) -> None:
        with smtplib.SMTP_SSL(
            self.relay.address, 465, context=unverified_context(), timeout=30
        ) as conn:
            conn.login(self.addr, self.password)
            conn.sendmail(self.addr, to_addrs, msg)

    def search(self, *criteria: str, timeout: float = 60) -> list[bytes]:
        """Every INBOX message matching the IMAP SEARCH criteria, once there is one."""
        deadline = time.monotonic() + timeout
        with self.imap() as conn:
            while True:
                conn.select("INBOX")
                _, data = conn.search(None, *criteria)
                ids = data[0].split()
                if ids:
                    found = []
                    for num in ids:
                        _, fetched = conn.fetch(num, "(RFC822)")
                        found.append(fetched[0][1])
                    return found
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nothing matches {criteria} in {self.addr} ({timeout} s)")
                time.sleep(0.5)

    def wait_for(self, msgid: str, timeout: float = 60) -> bytes:
        return self.search("HEADER", "Message-ID", msgid, timeout=timeout)[-1]

    def count(self, msgid: str) -> int:
        with self.imap() as conn:
            conn.select("INBOX")
            _, data = conn.search(None, "HEADER", "Message-ID", msgid)
            return len(data[0].split())


# --- the MTAs' logs and queues ------------------------------------------------------------


def _journal(host, source: list[str]) -> list[dict]:
    out = host.run(["journalctl", "--no-pager", "-o", "json", *source]).stdout
    entries = [json.loads(line) for line in out.splitlines()]
    return [e for e in entries if isinstance(e.get("MESSAGE"), str)]


def _session(entry: dict, mta: str) -> str:
    # Postfix: one smtpd process per connection at a time; OpenSMTPD: a session id
    return entry.get("_PID", "") if mta == "postfix" else entry["MESSAGE"].split()[0]


def inbound_session(host, mta: str, from_addr: str, to_addr: str) -> list[str]:
    """The receiving MTA's log lines of the SMTP session that accepted this envelope."""
    source = ["-t", "postfix/smtpd"] if mta == "postfix" else ["-u", "opensmtpd"]
    entries = _journal(host, source)
    envelope = f"from=<{from_addr}> to=<{to_addr}>"
    sessions = {_session(e, mta) for e in entries if envelope in e["MESSAGE"]}
    return [e["MESSAGE"] for e in entries if _session(e, mta) in sessions]


def outbound_session(host, mta: str, to_addr: str) -> list[str]:
    """The sending MTA's log lines of the delivery to this recipient."""
    source = ["-t", "postfix/smtp"] if mta == "postfix" else ["-u", "opensmtpd"]
    entries = _journal(host, source)

    def delivered(message: str) -> bool:
        if mta == "postfix":
            return f"to=<{to_addr}>" in message and "status=sent" in message
        return " mta delivery " in message and f"to=<{to_addr}>" in message

    sessions = {_session(e, mta) for e in entries if delivered(e["MESSAGE"])}
    return [e["MESSAGE"] for e in entries if _session(e, mta) in sessions]


def queued_for(host, mta: str, recipient: str) -> list[str]:
    """Queue ids of mail waiting for ``recipient`` in the relay's MTA."""
    if mta == "postfix":
        out = host.run(["postqueue", "-j"]).stdout
        ids = []
        for line in out.splitlines():
            entry = json.loads(line)
            if any(r["address"] == recipient for r in entry["recipients"]):
                ids.append(entry["queue_id"])
        return ids
    out = host.run(["smtpctl", "show", "queue"]).stdout
    return [line.split("|", 1)[0] for line in out.splitlines() if f"|{recipient}|" in line]


def flush_queue(host, mta: str) -> None:
    """Retry every deferred delivery now (what the MTA does by itself after a while)."""
    if mta == "postfix":
        host.run(["postqueue", "-f"])
    else:
        host.run(["smtpctl", "schedule", "all"])


# --- SMTP between relays, from inside the sending relay -----------------------------------

_SMTP_SCRIPT = r"""
import json, smtplib, ssl, sys
req = json.load(sys.stdin)
stage, reply = "connect", (0, "")
try:
    with smtplib.SMTP(req["host"], 25, local_hostname=req["helo"], timeout=30) as conn:
        stage = "ehlo"
        conn.ehlo()
        if req["starttls"]:
            stage = "starttls"
            ctx = ssl.create_default_context()  # the lab CA is in the relay's trust store
            if not req["verify"]:
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            conn.starttls(context=ctx)
            conn.ehlo()
        stage = "mail"
        reply = conn.mail(req["mail_from"])
        if reply[0] == 250:
            stage = "rcpt"
            reply = conn.rcpt(req["rcpt"])
        if reply[0] == 250 and req["msg"] is not None:
            stage = "data"
            reply = conn.data(req["msg"].encode("latin-1"))
except smtplib.SMTPResponseException as exc:
    reply = (exc.smtp_code, exc.smtp_error)
out = reply[1].decode() if isinstance(reply[1], bytes) else reply[1]
print(json.dumps({"stage": stage, "code": reply[0], "text": out}))
"""


def smtp_from_relay(
    lab: labctl.Lab,
    sender: labctl.RelaySpec,
    receiver: labctl.RelaySpec,
    mail_from: str,
    rcpt: str,
    msg: bytes | None,
    starttls: bool = True,
) -> dict:
    """One SMTP transaction from ``sender``'s address to ``receiver``'s port 25, as the
    sender's MTA would make it: {"stage": where it ended, "code": .., "text": ..}.
    Without ``msg`` it ends after RCPT."""
    request = {
        "host": receiver.domain,
        "helo": sender.address_domain,  # an IP relay greets with its address literal
        "starttls": starttls,
        "verify": receiver.lab_ca_cert,
        "mail_from": mail_from,
        "rcpt": rcpt,
        "msg": None if msg is None else msg.decode("latin-1"),
    }
    res = lab.relay(sender.minion_id).run(
        ["python3", "-c", _SMTP_SCRIPT], input=json.dumps(request)
    )
    return json.loads(res.stdout)


def dkim_key(lab: labctl.Lab, relay: labctl.RelaySpec) -> bytes:
    """The relay's own DKIM private key (selector ``opendkim``)."""
    return lab.relay(relay.minion_id).read_file("/etc/dkimkeys/opendkim.private").encode()


def dkim_signed(msg: bytes, domain: str, key: bytes) -> bytes:
    return dkim.sign(msg, b"opendkim", domain.encode(), key, include_headers=SIGNED_HEADERS) + msg


# --- Delta Chat in the lab's client namespace ---------------------------------------------


def start_lab_rpc(netns_prefix: list[str], accounts_dir: Path):
    """A deltachat-rpc-server inside the lab (its client namespace: the lab DNS)."""
    from deltachat_rpc_client import Rpc

    server = Path(sys.executable).parent / "deltachat-rpc-server"
    rpc = Rpc(accounts_dir=str(accounts_dir), rpc_server_path=[*netns_prefix, str(server)])
    rpc.start()
    return rpc


def wait_for_text(account, text: str, timeout: float = 120):
    """The next incoming message with this text (securejoin's own messages are skipped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = account.wait_for_incoming_msg().get_snapshot()
        if msg.text == text:
            return msg
    raise TimeoutError(f"{account.addr} got no message {text!r} in {timeout} s")


def dclogin_qr(addr: str, password: str, relay: labctl.RelaySpec) -> str:
    """Delta Chat's login code for the relay by its name (resolved by the lab DNS).

    Certificates are not checked (``ic=3``, as for a `_` domain): Delta Chat's TLS
    (rustls) trusts only its compiled-in roots, never SSL_CERT_FILE or the system store,
    so it cannot be taught the lab CA. Relay-to-relay TLS, the MTAs', is verified."""
    return (
        f"dclogin:{addr}?p={urllib.parse.quote(password, safe='')}&v=1"
        f"&ih={relay.domain}&ip=993&is=ssl&sh={relay.domain}&sp=465&ss=ssl&ic=3"
    )


def new_account_qr(relay: labctl.RelaySpec) -> str:
    """The ``dclogin:`` URL the relay's own ``POST /new`` hands out (self-signed relays)."""
    conn = http.client.HTTPSConnection(relay.address, 443, context=unverified_context(), timeout=30)
    try:
        conn.request("POST", "/new", headers={"Host": relay.domain})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 200, (response.status, body)
    return json.loads(body)["dclogin_url"]


def online_account(deltachat, relay: labctl.RelaySpec):
    """A Delta Chat profile for a fresh account on the relay, online. An IP relay's account
    comes from its ``/new`` (its dclogin: URL names the address as the servers), as a user
    would scan it; the others' are made up here and logged in by name."""
    if relay.ip_relay:
        qr = new_account_qr(relay)
    else:
        account_data = Account(relay)
        qr = dclogin_qr(account_data.addr, account_data.password, relay)
    account = deltachat.add_account()
    account.add_transport_from_qr(qr)
    account.set_config("bcc_self", "0")
    account.bring_online()
    account.addr = account.get_config("configured_addr")
    assert account.addr.endswith(f"@{relay.address_domain}"), account.addr
    account.relay = relay
    return account

