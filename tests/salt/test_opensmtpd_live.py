"""OpenSMTPD for real: Debian 13's smtpd (7.6.0p1) runs the smtpd.conf this formula renders,
with chatmail-smtpd-table from this repository as its account table and filtermail from
this repository as the filter, and delivers over LMTP to a recording sink.

smtpd, filter-dkimsign, doas and the account table run in a Debian 13 chroot (an overlay
on a cached root, so nothing persists between runs); filtermail and the LMTP sink run on
the host, on loopback ports, like Dovecot would. Listeners use ephemeral ports on
127.0.0.1 only. What this proves:

- an account created by the first IMAP login (doveauth's rules, as the vmail user) logs
  in over SMTP with its mixed-case password (the table serves smtpd ``credentials``:
  smtpd lowercases ``auth`` keys, which would break such passwords); its lowercased or a
  wrong password fail, and an SMTP login never creates an account;
- MAIL FROM must be the login (``senders <chatmail>``);
- encrypted mail passes filtermail, is DKIM-signed by filter-dkimsign on reinjection
  (the signature verifies against our key) and is delivered by LMTP;
- cleartext to another domain is refused by filtermail with 523. OpenSMTPD has no
  before-queue proxy, so the refusal reaches the sender as a bounce (DSN) in their
  mailbox, not as the SMTP reply;
- port 25 requires STARTTLS and delivers incoming encrypted mail through filtermail.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import hashlib
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import dkim
import pytest
from aiosmtpd.lmtp import LMTP
from filelock import FileLock

sys.path.insert(0, str(Path(__file__).parent))
from chroots import debian_chroot
from opensmtpd_support import REPO, TRIXIE_RUNTIME, Renderer, unmount

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


def write_ini(path: Path, mailboxes: str, counters: str, ports: dict[str, int]) -> None:
    params = {
        "mail_domain": DOMAIN,
        "mailboxes_dir": mailboxes,
        "counters_dir": counters,
        "nocreate_file": "/nonexistent/chatmail-nocreate",
        "passdb_path": "/nonexistent/passdb.sqlite",
        "filtermail_smtp_port": ports["filter_out"],
        "filtermail_smtp_port_incoming": ports["filter_in"],
        "postfix_reinject_port": ports["reinject_out"],
        "postfix_reinject_port_incoming": ports["reinject_in"],
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
def relay(tmp_path_factory):
    lower = debian_chroot("trixie", TRIXIE_RUNTIME)
    ensure_venv(lower)
    work = tmp_path_factory.mktemp("opensmtpd")
    upper, overlay_work, root = work / "upper", work / "ovl-work", work / "root"
    for d in (upper, overlay_work, root):
        d.mkdir()
    run(["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={lower},upperdir={upper},workdir={overlay_work}", str(root)])  # fmt: skip
    procs: list[subprocess.Popen] = []
    sink = LmtpSink()
    try:
        yield start_relay(root, work, sink, procs)
    finally:
        for proc in reversed(procs):
            stop(proc)
        sink.stop()
        unmount(root)


def state_arg(states: dict, sid: str, key: str):
    """One argument of a compiled ``file.*`` state."""
    return next(arg[key] for arg in states[sid]["file"] if isinstance(arg, dict) and key in arg)


def start_relay(root: Path, work: Path, sink: LmtpSink, procs: list) -> dict:
    names = ["smtp", "submission", "submissions", "filter_out", "filter_in", "reinject_out",
             "reinject_in"]  # fmt: skip
    ports = dict(zip(names, free_ports(len(names))))

    chroot(root, "useradd", "--system", "--home-dir", "/home/vmail", "--create-home", "vmail")
    mailboxes = f"/home/vmail/mail/{DOMAIN}"
    chroot(root, "install", "-d", "-o", "vmail", "-g", "vmail", "-m", "0700", mailboxes,
           "/var/lib/chatmail/counters")  # fmt: skip
    write_ini(root / INI.lstrip("/"), mailboxes, "/var/lib/chatmail/counters", ports)
    (root / INI.lstrip("/")).chmod(0o644)
    # filtermail runs on the host, looking at the same mailboxes through the overlay.
    host_ini = work / "filtermail.ini"
    write_ini(host_ini, str(root / mailboxes.lstrip("/")), str(work / "counters"), ports)

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
            "ports": {k: ports[k] for k in ("smtp", "submission", "submissions")},
            "settings": {
                "filtermail_smtp_port": ports["filter_out"],
                "filtermail_smtp_port_incoming": ports["filter_in"],
                "postfix_reinject_port": ports["reinject_out"],
                "postfix_reinject_port_incoming": ports["reinject_in"],
            },
            "paths": {"venv": VENV, "ini": INI},
            "dkim": {"key_dir": "/etc/dkimkeys"},
            "opensmtpd": {
                "listen": ["127.0.0.1"],
                "lmtp_socket": f"127.0.0.1:{sink.port}",
            },
        }
    }
    renderer = Renderer(work / "salt", "Debian-13", pillar)
    smtpd_conf = renderer.template("salt://chatmail/mta/opensmtpd/files/smtpd.conf.jinja")
    (root / "etc/smtpd.conf").write_text(smtpd_conf)
    states = renderer.highstate("chatmail.mta.opensmtpd")
    (root / "etc/mailname").write_text(state_arg(states, "chatmail-mta-mailname", "contents"))
    doas_conf = root / "etc/doas.conf"
    doas_conf.write_text(state_arg(states, "chatmail-mta-doas", "content"))
    doas_conf.chmod(0o600)
    table = root / state_arg(states, "chatmail-mta-table", "name").lstrip("/")
    table.write_text(renderer.template(state_arg(states, "chatmail-mta-table", "source")))
    table.chmod(0o755)
    chroot(root, "smtpd", "-n", "-f", "/etc/smtpd.conf")

    env = {**os.environ, "FILTERMAIL_SKIP_DKIM": "1"}
    filtermail = (
        str(REPO / ".venv/bin/filtermail")
        if (REPO / ".venv/bin/filtermail").exists()
        else "filtermail"
    )
    for mode, port in (("outgoing", ports["filter_out"]), ("incoming", ports["filter_in"])):
        log = work / f"filtermail-{mode}.log"
        with log.open("w") as out:
            proc = subprocess.Popen([filtermail, str(host_ini), mode], stdout=out, stderr=out,
                                    env=env, start_new_session=True)  # fmt: skip
        procs.append(proc)
        wait_port(port, proc, log)

    smtpd_log = work / "smtpd.log"
    with smtpd_log.open("w") as out:
        smtpd = subprocess.Popen(
            ["chroot", str(root), "smtpd", "-d", "-f", "/etc/smtpd.conf"],
            stdout=out, stderr=out, start_new_session=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"},
        )  # fmt: skip
    procs.append(smtpd)
    for name in ("submission", "submissions", "smtp", "reinject_out", "reinject_in"):
        wait_port(ports[name], smtpd, smtpd_log)
    return {
        "root": root,
        "ports": ports,
        "sink": sink,
        "mailboxes": root / mailboxes.lstrip("/"),
        "dkim_public": public_der.strip(),
        "smtpd_log": smtpd_log,
        "smtpd_conf": smtpd_conf,
    }


def tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the relay's self-signed test certificate
    return context


def submission(relay) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", relay["ports"]["submission"], timeout=60)
    client.starttls(context=tls_context())
    return client


def new_address(prefix: str) -> str:
    return f"{prefix}{os.urandom(3).hex()}"[:9] + f"@{DOMAIN}"


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
    assert "senders <chatmail>" in relay["smtpd_conf"]
    assert 'filter "dkimsign"' in relay["smtpd_conf"]


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


def test_smtp_login_never_creates_an_account(relay):
    addr = new_address("unknown")
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
        client.sendmail(sender, [rcpt], mail("encrypted", sender, rcpt))
    delivered = relay["sink"].wait_for(rcpt)
    message = email.message_from_bytes(delivered)
    signature = message["DKIM-Signature"]
    assert signature and f"d={DOMAIN}" in signature.replace(" ", "") and "s=opendkim" in signature

    assert dkim.verify(delivered, dnsfunc=dkim_dns(relay))


def test_cleartext_to_outside_is_refused_with_523(relay):
    sender = new_address("clear")
    with login(relay, sender) as client:
        # accepted into the queue: OpenSMTPD asks filtermail only afterwards
        client.sendmail(
            sender, ["someone@example.org"], mail("plain", sender, "someone@example.org")
        )
    delivered = relay["sink"].wait_for(sender)
    bounce = delivered.decode(errors="replace")
    assert "523 Encryption Needed: Invalid Unencrypted Mail" in bounce
    # the bounce is ours: from our domain and DKIM-signed for it (upstream signs bounces too)
    message = email.message_from_bytes(delivered)
    assert message["From"].lower().endswith(f"@{DOMAIN}>") or message["From"].lower().endswith(
        f"@{DOMAIN}"
    )
    assert dkim.verify(delivered, dnsfunc=dkim_dns(relay))
    assert not [r for r in relay["sink"].received if "someone@example.org" in r[1]]


def test_port_25_requires_starttls(relay):
    with smtplib.SMTP("127.0.0.1", relay["ports"]["smtp"], timeout=30) as client:
        client.ehlo("remote.example")
        code, _ = client.mail("someone@remote.example")
        assert code == 530


def test_incoming_encrypted_mail_through_filtermail(relay):
    rcpt = new_address("inbox")
    login(relay, rcpt).quit()
    with smtplib.SMTP("127.0.0.1", relay["ports"]["smtp"], timeout=60) as client:
        client.starttls(context=tls_context())
        client.sendmail("carol@remote.example", [rcpt],
                        mail("encrypted", "carol@remote.example", rcpt))  # fmt: skip
    delivered = relay["sink"].wait_for(rcpt)
    assert b"-----BEGIN PGP MESSAGE-----" in delivered
    # signed by us only on the way out, never on the way in
    assert email.message_from_bytes(delivered)["DKIM-Signature"] is None


def test_incoming_for_other_domains_is_refused(relay):
    with smtplib.SMTP("127.0.0.1", relay["ports"]["smtp"], timeout=60) as client:
        client.starttls(context=tls_context())
        client.ehlo("remote.example")
        assert client.mail("carol@remote.example")[0] == 250
        code, _ = client.rcpt("victim@elsewhere.example")
        assert code >= 500


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
