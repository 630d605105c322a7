"""OpenSMTPD for real: Debian 13's smtpd (7.6.0p1) runs the smtpd.conf this formula renders,
with chatmail-smtpd-table from this repository as its account table and
chatmail-smtpd-filter (filtermail's rules as smtpd-filters(7) filters) as its filters, and
delivers over LMTP to a recording sink.

smtpd, its filters, filter-dkimsign, doas and the account table run in a Debian 13 chroot
(an overlay on a cached root, so nothing persists between runs); the LMTP sink and an
authoritative DNS server (NSD, for DKIM keys of a remote domain) run on the host, on
loopback ports. Listeners use ephemeral ports on 127.0.0.1 only. What this proves:

- an account created by the first IMAP login (doveauth's rules, as the vmail user) logs
  in over SMTP with its mixed-case password (the table serves smtpd ``credentials``:
  smtpd lowercases ``auth`` keys, which would break such passwords); its lowercased or a
  wrong password fail;
- the first login may be an SMTP ``AUTH PLAIN`` one: the outgoing filter sees the
  initial response in smtpd's ``auth`` phase and creates the account by doveauth's rules
  (as vmail) before smtpd looks up the credentials; ``AUTH LOGIN`` creates nothing;
- MAIL FROM must be the login (``senders <chatmail>``);
- encrypted mail passes the outgoing filter, is DKIM-signed by filter-dkimsign after it
  (the signature verifies against our key) and is delivered by LMTP, once;
- cleartext is refused with filtermail's 523 as the SMTP reply at the end of DATA, on
  submission and on port 25 (no bounce): the filters answer before smtpd does;
- port 25 requires STARTTLS, verifies DKIM with strict alignment (an unsigned message is
  refused with 554) and delivers signed encrypted mail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import hashlib
import itertools
import json
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import dkim
import pytest
from aiosmtpd.lmtp import LMTP
from chroots import debian_chroot
from dnsserver import txt_strings
from filelock import FileLock
from opensmtpd_support import REPO, TRIXIE_RUNTIME, unmount
from saltsupport import PLATFORMS

from chatmaild.accounts import verify_password

pytestmark = [
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chroot, overlay mount"),
]

DOMAIN = "chat.example"
PASSWORD = "Correct-Horse-Battery|9"
VENV = "/opt/chatmail/venv"
INI = "/etc/chatmail/chatmail.ini"
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
MAIL_DATA = REPO / "tests" / "chatmaild" / "mail-data"
# Account creation checks the load and free memory/disk: never let a busy CI host refuse.
RELAXED = {"max_load_1m": 99999, "min_available_memory": "0", "min_free_disk_space": "0"}
REMOTE = "remote.example"


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, **kwargs)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res


def chroot(root: Path, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
    return run(["chroot", str(root), *cmd], env=env, **kwargs)


def source_digest() -> str:
    """What the chroot's venv was built from: the package sources and their metadata."""
    h = hashlib.sha256()
    for path in sorted([REPO / "pyproject.toml", *(REPO / "chatmaild").rglob("*.py")]):
        h.update(path.relative_to(REPO).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def ensure_venv(root: Path) -> None:
    """The relay's Python package installed into a venv of the cached trixie root."""
    stamp = root / "opt/chatmail/.installed-from"
    digest = source_digest()
    with FileLock(str(root.parent / f".{root.name}.venv.lock")):
        if stamp.exists() and stamp.read_text() == digest:
            return
        src = root / "opt/chatmail/src"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, src / name)
        for package in ("chatmaild", "api", "www"):
            shutil.copytree(REPO / package, src / package,
                            ignore=shutil.ignore_patterns("__pycache__", "build"))  # fmt: skip
        shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
        # the host's CA bundle: PyPI may sit behind a TLS-intercepting proxy
        shutil.copy(HOST_CA_BUNDLE, root / "opt/chatmail/host-ca.crt")
        if not (root / VENV.lstrip("/") / "bin/python").exists():
            chroot(root, "python3", "-m", "venv", VENV)
        chroot(root, f"{VENV}/bin/pip", "install", "-q", "--no-cache-dir",
               "--cert", "/opt/chatmail/host-ca.crt", "/opt/chatmail/src", timeout=900)  # fmt: skip
        stamp.write_text(digest)


class LmtpSink:
    """Dovecot's stand-in: an LMTP server on loopback recording every delivery."""

    def __init__(self):
        self.received: list[tuple[str, list[str], bytes]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _start(self):
        return await self.loop.create_server(lambda: LMTP(self), "127.0.0.1", 0)

    async def handle_DATA(self, server, session, envelope):
        self.received.append(
            (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
        )
        return "250 2.0.0 Ok"

    def wait_for(self, rcpt: str, timeout: float = 60) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, rcpts, content in self.received:
                if rcpt in rcpts:
                    return content
            time.sleep(0.2)
        raise AssertionError(f"nothing delivered to {rcpt}; got {[r[1] for r in self.received]}")

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def write_ini(path: Path, mailboxes: str, counters: str, dns_resolver: str) -> None:
    params = {
        "mail_domain": DOMAIN,
        "mailboxes_dir": mailboxes,
        "counters_dir": counters,
        "nocreate_file": "/nonexistent/chatmail-nocreate",
        "passdb_path": "/nonexistent/passdb.sqlite",
        # the incoming filter looks up DKIM keys in the host's NSD (same network namespace)
        "dns_resolver": dns_resolver,
        **RELAXED,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[params]\n" + "".join(f"{k} = {v}\n" for k, v in params.items()))


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    raise AssertionError(f"port {port} never opened:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(10)


@pytest.fixture(scope="module")
def remote_key(dns_server) -> bytes:
    """A DKIM key of the remote domain, its public half published in NSD; the private PEM."""
    private = run(["openssl", "genrsa", "2048"]).stdout.encode()
    public = subprocess.run(
        ["openssl", "rsa", "-pubout", "-outform", "DER"],
        input=private, capture_output=True, check=True,
    ).stdout  # fmt: skip
    record = txt_strings(f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}")
    dns_server.set_zone(REMOTE, [f"sel._domainkey TXT {record}"])
    return private


@contextlib.contextmanager
def live_relay(work: Path, render, dns_resolver: str, extra: dict | None = None):
    """smtpd with the rendered config in an overlay of the cached trixie root, delivering
    to an LmtpSink; ``extra`` is merged into the pillar's ``chatmail`` (one level deep)."""
    lower = debian_chroot("trixie", TRIXIE_RUNTIME)
    ensure_venv(lower)
    upper, overlay_work, root = work / "upper", work / "ovl-work", work / "root"
    for d in (upper, overlay_work, root):
        d.mkdir()
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={lower},upperdir={upper},workdir={overlay_work}", str(root)])  # fmt: skip
    procs: list[subprocess.Popen] = []
    sink = LmtpSink()
    try:
        yield start_relay(root, work, render, sink, procs, dns_resolver, extra or {})
    finally:
        for proc in reversed(procs):
            stop(proc)
        sink.stop()
        unmount(root)


@pytest.fixture(scope="module")
def relay(tmp_path_factory, render, dns_server, remote_key):
    work = tmp_path_factory.mktemp("opensmtpd")
    with live_relay(work, render, dns_server.address) as started:
        yield {**started, "remote_key": remote_key}


def state_arg(states: dict, sid: str, key: str):
    """One argument of a compiled ``file.*`` state."""
    return next(arg[key] for arg in states[sid]["file"] if isinstance(arg, dict) and key in arg)


def start_relay(
    root: Path, work: Path, render, sink: LmtpSink, procs: list, dns_resolver: str, extra: dict
) -> dict:
    names = ["smtp", "submission", "submissions"]
    # and the loopback listener POST /mxdeliv reinjects into, ephemeral like the others
    *listeners, mxdeliv_reinject = free_ports(len(names) + 1)
    ports = dict(zip(names, listeners))

    chroot(root, "useradd", "--system", "--home-dir", "/home/vmail", "--create-home", "vmail")
    mailboxes = f"/home/vmail/mail/{DOMAIN}"
    chroot(root, "install", "-d", "-o", "vmail", "-g", "vmail", "-m", "0700", mailboxes,
           "/var/lib/chatmail/counters")  # fmt: skip
    write_ini(root / INI.lstrip("/"), mailboxes, "/var/lib/chatmail/counters", dns_resolver)
    (root / INI.lstrip("/")).chmod(0o644)

    cert, key = "/etc/ssl/certs/mailserver.pem", "/etc/ssl/private/mailserver.key"
    chroot(root, "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
           "ec_paramgen_curve:P-256", "-noenc", "-days", "3", "-keyout", key, "-out", cert,
           "-subj", f"/CN={DOMAIN}")  # fmt: skip
    chroot(root, "install", "-d", "-o", "_dkimsign", "-g", "_dkimsign", "-m", "0750",
           "/etc/dkimkeys")  # fmt: skip
    chroot(root, "openssl", "genrsa", "-out", "/etc/dkimkeys/opendkim.private", "2048")
    chroot(root, "chown", "_dkimsign:_dkimsign", "/etc/dkimkeys/opendkim.private")
    public_der = chroot(root, "sh", "-c", "openssl rsa -in /etc/dkimkeys/opendkim.private "
                        "-pubout -outform DER 2>/dev/null | base64 -w0").stdout  # fmt: skip

    pillar = {
        "chatmail": {
            "mail_domain": DOMAIN,
            "mta": "opensmtpd",
            "ipv6": False,
            "tls": {"mode": "external", "cert": cert, "key": key},
            "ports": ports,
            "settings": {"postfix_reinject_port_incoming": mxdeliv_reinject,
                         **extra.get("settings", {})},
            "paths": {"venv": VENV, "ini": INI},
            "dkim": {"key_dir": "/etc/dkimkeys"},
            "opensmtpd": {
                "listen": ["127.0.0.1"],
                "lmtp_socket": f"127.0.0.1:{sink.port}",
            },
        }
    }
    pillar["chatmail"].update((k, v) for k, v in extra.items() if k != "settings")
    rendered = render("debian13", "opensmtpd-live", pillar=pillar, grains=PLATFORMS["debian13"])
    smtpd_conf = rendered.text("/etc/smtpd.conf")
    (root / "etc/smtpd.conf").write_text(smtpd_conf)
    states = rendered.states
    (root / "etc/mailname").write_text(state_arg(states, "chatmail-mta-mailname", "contents"))
    doas_conf = root / "etc/doas.conf"
    doas_conf.write_text(state_arg(states, "chatmail-mta-doas", "content"))
    doas_conf.chmod(0o600)
    table = root / state_arg(states, "chatmail-mta-table", "name").lstrip("/")
    table.write_text(rendered.text(state_arg(states, "chatmail-mta-table", "name")))
    table.chmod(0o755)
    chroot(root, "smtpd", "-n", "-f", "/etc/smtpd.conf")

    smtpd_log = work / "smtpd.log"
    started = {
        "root": root,
        "ports": ports,
        "sink": sink,
        "mailboxes": root / mailboxes.lstrip("/"),
        "dkim_public": public_der.strip(),
        "smtpd_log": smtpd_log,
        "smtpd_conf": smtpd_conf,
        "settings": rendered.map["settings"],
        "opensmtpd_user": rendered.map["opensmtpd"]["user"],
        "pillar": pillar,
        "procs": procs,
    }
    run_smtpd(started)
    return started


def run_smtpd(relay: dict) -> None:
    """Start smtpd on the chroot's /etc/smtpd.conf (appending to its log); stop a running one
    first, as a restart after a config change does."""
    if "smtpd" in relay:
        stop(relay["smtpd"])
    root, log = relay["root"], relay["smtpd_log"]
    with log.open("a") as out:
        smtpd = subprocess.Popen(
            ["chroot", str(root), "smtpd", "-d", "-f", "/etc/smtpd.conf"],
            stdout=out, stderr=out, start_new_session=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"},
        )  # fmt: skip
    relay["procs"].append(smtpd)
    relay["smtpd"] = smtpd
    for port in relay["ports"].values():
        wait_port(port, smtpd, log)


def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the relay's self-signed test certificate
    return context


_sources = itertools.count(1)


def submission(relay, source: str = "") -> smtplib.SMTP:
    """A STARTTLS connection, from a loopback address of its own unless ``source`` is
    given: the filter counts failed logins per client address, and the tests here fail
    logins on purpose."""
    n = next(_sources)
    source = source or f"127.1.{n // 250}.{n % 250 + 1}"
    client = smtplib.SMTP(
        "127.0.0.1", relay["ports"]["submission"], timeout=60, source_address=(source, 0)
    )
    client.starttls(context=tls_context())
    return client


def new_address(prefix: str) -> str:
    """9 characters (the relay's username length), at least 5 of them random: a longer
    prefix once left 2 random ones, and parametrized tests met each other's accounts."""
    return f"{prefix[:4]}{os.urandom(4).hex()}"[:9] + f"@{DOMAIN}"


def mail(name: str, from_addr: str, to_addr: str, subject: str = "test") -> bytes:
    text = (MAIL_DATA / f"{name}.eml").read_text()
    return (
        text.format(from_addr=from_addr, to_addr=to_addr, subject=subject)
        .replace("\n", "\r\n")
        .encode()
    )


def create_account(relay, addr: str, password: str = PASSWORD) -> None:
    """What a first IMAP login does through doveauth: the same rules, as vmail."""
    code = (
        "import sys; from chatmaild.accounts import get_or_create; "
        "from chatmaild.config import read_config; "
        "assert get_or_create(read_config(sys.argv[1]), sys.argv[2], sys.argv[3]).password_hash"
    )
    chroot(relay["root"], "runuser", "-u", "vmail", "--",
           f"{VENV}/bin/python", "-c", code, INI, addr, password)  # fmt: skip


def login(relay, addr: str, password: str = PASSWORD) -> smtplib.SMTP:
    if not (relay["mailboxes"] / addr / "password").exists():
        create_account(relay, addr, password)
    client = submission(relay)
    client.login(addr, password)
    return client


def dkim_dns(relay):
    """dkimpy's TXT lookup, answering only our selector's record."""

    def dns(name, timeout=5):
        assert name == f"opendkim._domainkey.{DOMAIN}.".encode()
        return f"v=DKIM1; k=rsa; p={relay['dkim_public']}".encode()

    return dns


def test_rendered_config_is_what_runs(relay):
    conf = relay["smtpd_conf"]
    assert "senders <chatmail>" in conf
    assert 'filter "submission" chain { "chatmail-out", "dkimsign" }' in conf
    assert f"{VENV}/bin/chatmail-smtpd-filter {INI} incoming" in conf
    assert "smtp+notls" not in conf  # no relay hop to a filtermail daemon


def test_account_logs_in_over_smtp_with_mixed_case_password(relay):
    addr = new_address("first")
    with login(relay, addr) as client:
        assert client.noop()[0] == 250
    password_file = relay["mailboxes"] / addr / "password"
    vmail_uid = int(chroot(relay["root"], "id", "-u", "vmail").stdout)
    assert password_file.stat().st_uid == vmail_uid


@pytest.mark.parametrize("wrong", [PASSWORD + "x", PASSWORD.lower()], ids=["wrong", "lowercased"])
def test_wrong_password_fails(relay, wrong):
    addr = new_address("wrong")
    login(relay, addr).quit()
    with submission(relay) as client, pytest.raises(smtplib.SMTPAuthenticationError) as err:
        client.login(addr, wrong)
    assert err.value.smtp_code == 535
    login(relay, addr).quit()  # the right one still works


def test_smtp_first_login_creates_the_account(relay):
    """AUTH PLAIN with an initial response (smtplib's and Delta Chat's way): the outgoing
    filter creates the account in smtpd's auth phase, smtpd then checks the hash."""
    addr = new_address("smtpfirst")
    password_file = relay["mailboxes"] / addr / "password"
    with submission(relay) as client:
        assert client.login(addr, PASSWORD)[0] == 235
        client.sendmail(addr, [addr], mail("encrypted", addr, addr))
    assert verify_password(PASSWORD, password_file.read_text().strip())
    vmail_uid = int(chroot(relay["root"], "id", "-u", "vmail").stdout)
    assert password_file.stat().st_uid == vmail_uid
    assert relay["sink"].wait_for(addr)
    # the mixed-case password was stored as typed: lowercased it fails
    with submission(relay) as client, pytest.raises(smtplib.SMTPAuthenticationError):
        client.login(addr, PASSWORD.lower())
    login(relay, addr).quit()


def test_auth_login_creates_nothing(relay):
    """AUTH LOGIN shows a filter no password: a first login that way fails, as before."""
    addr = new_address("authlogin")
    with submission(relay) as client:
        client.ehlo()
        assert client.docmd("AUTH", "LOGIN")[0] == 334
        assert client.docmd(base64.b64encode(addr.encode()).decode())[0] == 334
        assert client.docmd(base64.b64encode(PASSWORD.encode()).decode())[0] == 535
    assert not (relay["mailboxes"] / addr).exists()


def test_smtp_login_respects_the_account_rules(relay):
    addr = f"postmaster@{DOMAIN}"  # reserved
    with submission(relay) as client, pytest.raises(smtplib.SMTPAuthenticationError):
        client.login(addr, PASSWORD)
    assert not (relay["mailboxes"] / addr).exists()


def test_login_over_implicit_tls(relay):
    addr = new_address("smtps")
    create_account(relay, addr)
    with smtplib.SMTP_SSL("127.0.0.1", relay["ports"]["submissions"], context=tls_context(),
                          timeout=60) as client:  # fmt: skip
        client.login(addr, PASSWORD)
        assert client.noop()[0] == 250


def test_sender_must_be_the_login(relay):
    addr, other = new_address("sender"), new_address("other")
    login(relay, other).quit()
    with login(relay, addr) as client:
        # smtpd's answer to a `senders` mismatch (Postfix says 553)
        assert client.mail(other) == (530, b"Sender rejected")
        client.rset()
        assert client.mail(addr)[0] == 250


def test_encrypted_mail_is_signed_and_delivered(relay):
    sender, rcpt = new_address("alice"), new_address("bob")
    login(relay, rcpt).quit()
    with login(relay, sender) as client:
        client.sendmail(sender, [rcpt], mail("encrypted", sender, rcpt, subject="secret"))
    delivered = relay["sink"].wait_for(rcpt)
    message = email.message_from_bytes(delivered)
    signature = message["DKIM-Signature"]
    assert signature and f"d={DOMAIN}" in signature.replace(" ", "") and "s=opendkim" in signature
    assert dkim.verify(delivered, dnsfunc=dkim_dns(relay))
    # Postfix's submission cleanup: no trace of the client, Subject hidden
    assert message["Subject"] == "[...]"
    assert message["Received"] is None
    # one hop only: delivered once, with one Delivered-To
    assert len(message.get_all("Delivered-To") or []) == 1
    assert len([r for r in relay["sink"].received if rcpt in r[1]]) == 1


def test_cleartext_to_outside_is_refused_with_523(relay):
    sender = new_address("clear")
    with login(relay, sender) as client, pytest.raises(smtplib.SMTPDataError) as err:
        client.sendmail(
            sender, ["someone@example.org"], mail("plain", sender, "someone@example.org")
        )
    # the SMTP reply at the end of DATA, filtermail's exact text: no queue, no bounce
    assert (err.value.smtp_code, err.value.smtp_error) == (
        523,
        b"Encryption Needed: Invalid Unencrypted Mail",
    )
    time.sleep(1)
    assert not [r for r in relay["sink"].received if sender in r[1]]
    assert not [r for r in relay["sink"].received if "someone@example.org" in r[1]]


def test_from_header_must_be_the_sender(relay):
    sender = new_address("forger")
    with login(relay, sender) as client, pytest.raises(smtplib.SMTPDataError) as err:
        client.sendmail(sender, [sender], mail("encrypted", "boss@example.org", sender))
    assert err.value.smtp_code == 500
    assert err.value.smtp_error == f"Invalid FROM <boss@example.org> for <{sender}>".encode()


def test_port_25_requires_starttls(relay):
    with smtplib.SMTP("127.0.0.1", relay["ports"]["smtp"], timeout=30) as client:
        client.ehlo("remote.example")
        code, _ = client.mail("someone@remote.example")
        assert code == 530


def remote_mail(relay, name: str, rcpt: str, signed: bool = True) -> bytes:
    data = mail(name, f"carol@{REMOTE}", rcpt)
    if not signed:
        return data
    return dkim.sign(data, b"sel", REMOTE.encode(), relay["remote_key"],
                     include_headers=[b"from", b"to", b"subject", b"date", b"message-id"]) + data  # fmt: skip


def port25(relay) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", relay["ports"]["smtp"], timeout=60)
    client.starttls(context=tls_context())
    return client


def test_incoming_signed_encrypted_mail_is_delivered(relay):
    rcpt = new_address("inbox")
    login(relay, rcpt).quit()
    with port25(relay) as client:
        client.sendmail(f"carol@{REMOTE}", [rcpt], remote_mail(relay, "encrypted", rcpt))
    delivered = relay["sink"].wait_for(rcpt)
    assert b"-----BEGIN PGP MESSAGE-----" in delivered
    message = email.message_from_bytes(delivered)
    # verified, then dropped like Postfix's lmtp_header_cleanup; never signed by us
    assert message["DKIM-Signature"] is None and message["Received"] is None
    assert len(message.get_all("Delivered-To") or []) == 1


@pytest.mark.parametrize(
    ("name", "signed", "code", "text"),
    [
        ("plain", True, 523, b"Encryption Needed: Invalid Unencrypted Mail"),
        ("encrypted", False, 554, b"5.7.1 No DKIM signature found"),
    ],
    ids=["cleartext", "unsigned"],
)
def test_incoming_refusals_are_smtp_replies(relay, name, signed, code, text):
    rcpt = new_address("refuse")
    login(relay, rcpt).quit()
    with port25(relay) as client, pytest.raises(smtplib.SMTPDataError) as err:
        client.sendmail(f"carol@{REMOTE}", [rcpt], remote_mail(relay, name, rcpt, signed))
    assert (err.value.smtp_code, err.value.smtp_error) == (code, text)
    time.sleep(1)
    assert not [r for r in relay["sink"].received if rcpt in r[1]]


def test_incoming_for_other_domains_is_refused(relay):
    with port25(relay) as client:
        client.ehlo("remote.example")
        assert client.mail("carol@remote.example")[0] == 250
        code, _ = client.rcpt("victim@elsewhere.example")
        assert code >= 500


def test_unknown_account_is_refused_at_rcpt(relay):
    """smtpd 7.6 takes every LMTP error for temporary (OpenSMTPD issue #1276), so Dovecot's
    550 for an unknown user would wait in the queue for days: the account table refuses
    the recipient at RCPT instead, and the sending MTA bounces at once."""
    known, unknown = new_address("known"), new_address("unknown")
    create_account(relay, known)
    with port25(relay) as client:
        client.ehlo("remote.example")
        assert client.mail(f"carol@{REMOTE}")[0] == 250
        assert client.rcpt(unknown) == (550, f"Invalid recipient: <{unknown}>".encode())
        assert client.rcpt(f"postmaster@{DOMAIN}")[0] == 550  # no account, as on Postfix
        assert client.rcpt(known)[0] == 250
        assert client.rcpt(known.replace("@", "+tag@"))[0] == 250
    assert not (relay["mailboxes"] / unknown).exists()


def test_submission_to_an_unknown_account_is_refused_not_relayed(relay):
    sender, unknown = new_address("sender"), new_address("nobody")
    with login(relay, sender) as client:
        assert client.mail(sender)[0] == 250
        assert client.rcpt(unknown)[0] == 550
        assert client.rcpt(sender)[0] == 250


def test_own_mail_reaches_accounts_only(relay):
    """smtpd's own mail (bounces) enters through the local socket, tag "own": delivered to
    an existing account, refused for an unknown one like any other."""
    known, unknown = new_address("ownmail"), new_address("ownnone")
    create_account(relay, known)
    message = f"From: MAILER-DAEMON@{DOMAIN}\nTo: {{}}\nSubject: report\n\nbody\n"
    chroot(relay["root"], "sendmail", "-f", "", known, input=message.format(known))
    assert b"Subject: report" in relay["sink"].wait_for(known)
    with pytest.raises(RuntimeError, match="Invalid recipient"):
        chroot(relay["root"], "sendmail", "-f", "", unknown, input=message.format(unknown))


def test_table_failure_is_temporary_and_smtpd_lives_on(relay):
    """An account table error (here: an unreadable password file) is a 4xx for that
    login only: smtpd 7.6 takes the table's ``error|<why>`` reply and keeps serving."""
    addr = new_address("error")
    create_account(relay, addr)
    password_file = relay["mailboxes"] / addr / "password"
    password_file.chmod(0o000)
    try:
        with submission(relay) as client, pytest.raises(smtplib.SMTPAuthenticationError) as err:
            client.login(addr, PASSWORD)
        assert err.value.smtp_code == 421
    finally:
        password_file.chmod(0o600)
    with login(relay, new_address("after")) as client:
        assert client.noop()[0] == 250


@pytest.mark.parametrize(
    "content", [b"", b"\n", b"{PLAIN}guessable1"], ids=["empty", "newline", "plain"]
)
def test_unusable_password_file_is_temporary_never_a_takeover(relay, content):
    """An existing account's empty or corrupt password file: the SMTP-first path (filter
    + table) answers 4xx and never stores the caller's password as the account's."""
    addr = new_address("corrupt")
    create_account(relay, addr)
    password_file = relay["mailboxes"] / addr / "password"
    password_file.write_bytes(content)
    with submission(relay) as client, pytest.raises(smtplib.SMTPAuthenticationError) as err:
        client.login(addr, "Attacker-Password|1")
    assert err.value.smtp_code == 421
    assert password_file.read_bytes() == content


def test_smtp_first_login_with_a_trailing_newline_creates_nothing(relay):
    addr = new_address("newline")
    localpart, _, domain = addr.partition("@")
    with submission(relay) as client, pytest.raises(smtplib.SMTPException):
        client.login(f"{localpart[:8]}\n@{domain}", PASSWORD)
    assert not [p for p in relay["mailboxes"].iterdir() if "\n" in p.name]


def test_oversize_message_is_refused_with_552(relay):
    """Larger than max_message_size: refused at the end of DATA, nothing delivered (the
    filter keeps at most max_message_size bytes of a message)."""
    sender, rcpt = new_address("big"), new_address("bigrcpt")
    login(relay, rcpt).quit()
    body = mail("encrypted", sender, rcpt) + b"x" * 998 + b"\r\n"
    big = body + (b"y" * 998 + b"\r\n") * (31_457_280 // 1000 + 10)
    with login(relay, sender) as client:
        client.ehlo()
        client.esmtp_features.pop("size", None)  # no SIZE= on MAIL FROM: get to DATA
        with pytest.raises(smtplib.SMTPDataError) as err:
            client.sendmail(sender, [rcpt], big)
    # filtermail's reply, from the filter (smtpd's own check would say otherwise)
    assert (err.value.smtp_code, err.value.smtp_error) == (552, b"Message exceeds maximum size")
    assert not [r for r in relay["sink"].received if rcpt in r[1]]


def test_failed_logins_are_throttled(relay):
    """After smtpd_auth_failures_max (10) failed logins from an address, new connections
    from it get 421 from the filter, before any credentials, even the right ones."""
    addr = new_address("guess")
    login(relay, addr).quit()
    attacker = "127.0.0.99"

    def attempt(password: str) -> int:
        try:
            with submission(relay, attacker) as client:
                return client.login(addr, password)[0]
        except (smtplib.SMTPConnectError, smtplib.SMTPAuthenticationError) as err:
            return err.smtp_code

    # (smtplib tries PLAIN, then LOGIN: two failed logins per attempt)
    codes = [attempt(PASSWORD + "guess")]
    while codes[-1] != 421 and len(codes) < 12:
        codes.append(attempt(PASSWORD + "guess"))
    log = relay["smtpd_log"].read_text()
    assert codes[-1] == 421 and set(codes[:-1]) <= {535}, (codes, log[-5000:])
    assert attempt(PASSWORD) == 421
    log = relay["smtpd_log"].read_text()
    assert f"refusing connection from {attacker}: too many failed logins" in log
    assert PASSWORD not in log and base64.b64encode(PASSWORD.encode()).decode() not in log


def test_blocked_account_is_refused_by_smtpd(relay):
    """A blocked address (the block list chatmail-adminctl writes): its SMTP login is
    refused by the table and mail to it by the filter's rcpt-to phase, with 5.2.1."""
    addr = new_address("blocked")
    create_account(relay, addr)
    blocklist = relay["root"] / "var/lib/chatmail/blocklist/blocked.json"
    blocklist.parent.mkdir(parents=True, exist_ok=True)
    entry = {"reason": "test", "by": "t", "since": 0, "deleted": False}
    blocklist.write_text(json.dumps({addr: entry}))
    try:
        with submission(relay) as client, pytest.raises(smtplib.SMTPAuthenticationError):
            client.login(addr, PASSWORD)
        with port25(relay) as client, pytest.raises(smtplib.SMTPRecipientsRefused) as err:
            client.sendmail(f"carol@{REMOTE}", [addr], remote_mail(relay, "encrypted", addr))
        code, text = err.value.recipients[addr]
        assert code == 550 and b"5.2.1" in text and b"disabled" in text, (code, text)
    finally:
        blocklist.unlink()
    login(relay, addr).quit()
