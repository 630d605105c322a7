"""Taking over a relay upstream's cmdeploy deployed: `scripts/deploy --adopt` in place.

A container of its own is made to look like an upstream 1.12 relay on disk and in
systemd (upstream-relay-inventory): chatmail.ini from upstream's template with an
operator's settings, upstream's venv, accounts with SHA512-CRYPT hashes, enforceE2EEincoming
markers, push tokens, last-login mtimes, /etc/chatmail-nocreate, the DKIM key and the
self-signed certificate where upstream keeps them, upstream's units (stand-ins holding
upstream's ports), fcgiwrap, upstream's apt pin, and a running mail system as upstream
configures it: Debian's Dovecot (maildirs, zlib_save = gz, so the mail it delivered before
the switch is gz-compressed by Dovecot itself) behind Postfix (LMTP, submission with
Dovecot SASL), with a message deferred in Postfix's queue. A Delta Chat client is set up
on two old accounts and exchanges a message before the switch. Then the operator's steps:
`--adopt --dry-run`, `--adopt` (the client stays running), and a second apply. Everything
kept is checked to be kept and read, the same client to keep working, and everything
upstream ran that this formula does not to be gone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import ssl
import time
import uuid
from pathlib import Path

import httpx
import pytest
import relayctl
import yaml
from deltachat_rpc_client import DeltaChat
from relayclient import (
    HOST,
    RelayClient,
    encrypted_mail,
    message_id,
    online_account,
    start_rpc,
)

pytestmark = [
    pytest.mark.container,
    pytest.mark.timeout(2400),
    # Upstream relays are Debian 12 with Postfix (its only documented target): adopted there.
    # The refusal of `mta: opensmtpd` is a pillar's, tested on the same container.
    pytest.mark.on_platforms("debian12-postfix"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
SESSIONS_DIR = Path("/var/tmp/chatmail-test")
DOMAIN = "_chatmail.test"
MAILBOXES = f"/home/vmail/mail/{DOMAIN}"
INI = "/usr/local/lib/chatmaild/chatmail.ini"
VENV = "/usr/local/lib/chatmaild/venv"
API_PORT = 8077
NOCREATE = "spam wave, Tuesday"
LEFTOVERS = yaml.safe_load((REPO_ROOT / "salt/chatmail/upstream/leftovers.yaml").read_text())

#: The operator's chatmail.ini: upstream's template (cmdeploy init) with edits; the
#: limits keep a busy test host from refusing accounts (as the other e2e pillars do).
UPSTREAM_INI = f"""\
[params]

# mail domain (MUST be set to fully qualified chat mail domain)
mail_domain = {DOMAIN}

# email sending rate per user and minute
max_user_send_per_minute = 600

#max_user_send_burst_size = 10
#max_mailbox_size = 500M
#max_message_size = 31457280

# days after which mails are unconditionally deleted
delete_mails_after = 40

#delete_large_after = 7
#delete_inactive_users_after = 90
#username_min_length = 9
#username_max_length = 9
#password_min_length = 9
max_load_1m = 1000
min_available_memory = 0
min_free_disk_space = 0

# if set to "True" IPv6 is disabled
disable_ipv6 = True

# mtail_address = 127.0.0.1
mtail_address = 127.0.0.1

# postal address of privacy contact
privacy_postal =

# email address of privacy contact
privacy_mail = privacy@example.org

privacy_pdo =
privacy_supervisor =
"""

#: Stand-in for upstream's daemons, at their binaries' paths: holds the port upstream's
#: holds (arguments: address port tcp|udp).
STANDIN = """\
#!/usr/bin/python3
import socket, sys, time
addr, port, proto = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port))
if proto == "tcp":
    s.listen(16)
while True:
    time.sleep(3600)
"""

#: unit -> (binary, address, port, tcp/udp): upstream's binaries and ports (inventory 3.13,
#: 3.14); acmetool's redirector is the acmetool package's, stood in for by a test file
UPSTREAM_DAEMONS = {
    "filtermail.service": ("/usr/local/bin/filtermail", "127.0.0.1", 10080, "tcp"),
    "filtermail-incoming.service": ("/usr/local/bin/filtermail", "127.0.0.1", 10081, "tcp"),
    "filtermail-transport.service": ("/usr/local/bin/filtermail", "127.0.0.1", 10083, "tcp"),
    "iroh-relay.service": ("/usr/local/bin/iroh-relay", "0.0.0.0", 3340, "tcp"),
    "turnserver.service": ("/usr/local/bin/chatmail-turn", "0.0.0.0", 3478, "udp"),
    "mtail.service": ("/usr/local/bin/mtail", "127.0.0.1", 3903, "tcp"),
    "acmetool-redirector.service": ("/usr/local/sbin/test-standin", "127.0.0.1", 402, "tcp"),
}

#: upstream's other units (oneshots and their timers, a path unit), enabled as upstream does
UPSTREAM_ONESHOTS = {
    "chatmail-fsreport": "timer",
    "acmetool-reconcile": "timer",
}


def sh(container, script: str, **kwargs):
    return container.run(script, **kwargs)


def make_account(container, name: str, password: str, messages: list[bytes]) -> dict:
    """A mailbox as upstream's doveauth leaves it (its mail comes through Postfix later)."""
    addr = f"{name}@{DOMAIN}"
    home = f"{MAILBOXES}/{addr}"
    hashed = sh(container, ["openssl", "passwd", "-6", password]).stdout.strip()
    sh(container, f"mkdir -p {home}")
    container.write_file(f"{home}/password", f"{{SHA512-CRYPT}}{hashed}", mode="0600")
    container.write_file(f"{home}/enforceE2EEincoming", "", mode="0600")
    tokens = {"devicetoken": {f"token-{name}": int(time.time()) - 3600}}
    container.write_file(f"{home}/metadata.json", json.dumps(tokens), mode="0600")
    # last login 3 days ago, day-rounded as upstream's lastlogin writes it
    day = (int(time.time()) // 86400 - 3) * 86400
    sh(container, f"touch -d @{day} {home}/password")
    return {"addr": addr, "password": password, "messages": messages, "home": home}


#: The accounts' passdb and userdb. Upstream's Dovecot asks doveauth through a dict socket
#: (/etc/dovecot/auth.conf), and doveauth answers from each mailbox's `password` file; this
#: passwd-file, generated from those files, stands in for it (doveauth is upstream's Python,
#: not installed here). The hashes are the same, so are the logins.
PASSWD_FILE = "/etc/dovecot/upstream-test-users"

_DOVECOT_COMMON = """\
protocols = imap lmtp
listen = 0.0.0.0
auth_mechanisms = plain
auth_username_chars = abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234567890.-_@[]
default_client_limit = 20000
mail_uid = vmail
mail_gid = vmail
mail_privileged_group = vmail
lmtp_add_received_header = no
namespace inbox {
  inbox = yes
  separator = /
  mailbox Drafts {
    special_use = \\Drafts
  }
  mailbox Junk {
    special_use = \\Junk
  }
  mailbox Trash {
    special_use = \\Trash
  }
  mailbox Sent {
    special_use = \\Sent
  }
}
service lmtp {
  user = vmail
  unix_listener /var/spool/postfix/private/dovecot-lmtp {
    user = postfix
    group = postfix
    mode = 0600
  }
}
service auth {
  unix_listener /var/spool/postfix/private/auth {
    user = postfix
    group = postfix
    mode = 0660
  }
}
service auth-worker {
  user = vmail
}
ssl = required
ssl_min_protocol = TLSv1.3
"""

#: upstream's dovecot.conf.j2 (inventory 3.6) in each release's syntax, without what
#: needs upstream's Python daemons (metadata, last-login, quota-warning, push) or what a
#: client does not see (limits, metrics). Debian 12's Dovecot 2.3 reads upstream's own
#: syntax; on Debian 13 the fake runs Debian's 2.4 (upstream installs its 2.3.21 .debs,
#: which cannot be downloaded here).
UPSTREAM_DOVECOT = {
    "bookworm": f"""\
# upstream relay 1.12's dovecot.conf (test stand-in)
imap_capability = +XCHATMAIL
passdb {{
  driver = passwd-file
  args = {PASSWD_FILE}
}}
userdb {{
  driver = passwd-file
  args = {PASSWD_FILE}
}}
mail_location = maildir:{MAILBOXES}/%u
mail_plugins = zlib
plugin {{
  zlib_save = gz
}}
ssl_cert = </etc/ssl/certs/mailserver.pem
ssl_key = </etc/ssl/private/mailserver.key
ssl_dh = </usr/share/dovecot/dh.pem
ssl_prefer_server_ciphers = yes
{_DOVECOT_COMMON}""",
    "trixie": f"""\
# upstream relay 1.12's dovecot.conf in Dovecot 2.4's syntax (test stand-in)
dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
imap_capability {{
  XCHATMAIL = yes
}}
passdb passwd-file {{
  passwd_file_path = {PASSWD_FILE}
}}
userdb passwd-file {{
  passwd_file_path = {PASSWD_FILE}
}}
mail_driver = maildir
mail_home = {MAILBOXES}/%{{user}}
mail_path = {MAILBOXES}/%{{user}}
mail_plugins {{
  mail_compress = yes
}}
mail_compress_write_method = gz
# lmtp runs as vmail; anvil's socket is root's otherwise
service anvil {{
  unix_listener anvil {{
    group = vmail
    mode = 0660
  }}
}}
ssl_server_cert_file = /etc/ssl/certs/mailserver.pem
ssl_server_key_file = /etc/ssl/private/mailserver.key
{_DOVECOT_COMMON}""",
}

#: Postfix as upstream's main.cf/master.cf have it for what a client and local delivery
#: see: local mail to Dovecot's LMTP, submission (587, STARTTLS) and smtps (465) with
#: Dovecot SASL. Upstream's filtermail proxies are left out (the stand-ins only hold ports).
SUBMISSION = [
    "syslog_name=postfix/{name}",
    "smtpd_tls_security_level=encrypt",
    "smtpd_sasl_auth_enable=yes",
    "smtpd_sasl_type=dovecot",
    "smtpd_sasl_path=private/auth",
    "smtpd_tls_auth_only=yes",
    "smtpd_relay_restrictions=permit_sasl_authenticated,reject",
]


def configure_mail(container, suite: str) -> None:
    """Dovecot and Postfix running as on an upstream relay."""
    sh(
        container,
        f"set -e; u=$(id -u vmail); g=$(id -g vmail); for home in {MAILBOXES}/*@*; do "
        'printf "%s:%s:%s:%s::%s::\\n" "${home##*/}" "$(cat "$home/password")" $u $g "$home"; '
        # Dovecot 2.4's auth process runs as the dovecot user
        f"done > {PASSWD_FILE}; chown root:dovecot {PASSWD_FILE}; chmod 640 {PASSWD_FILE}",
    )
    container.write_file("/etc/dovecot/dovecot.conf", UPSTREAM_DOVECOT[suite])
    master, params = [], []
    for name, extra in (("submission", []), ("smtps", ["smtpd_tls_wrappermode=yes"])):
        master.append(f"{name}/inet={name} inet n - y - - smtpd")
        params += [f"{name}/inet/{p.format(name=name)}" for p in SUBMISSION + extra]
    sh(
        container,
        "set -e; postconf -e 'inet_interfaces = all' 'inet_protocols = ipv4' "
        f"'mydestination = {DOMAIN}' 'myhostname = {DOMAIN}' 'local_recipient_maps =' "
        "'local_transport = lmtp:unix:private/dovecot-lmtp' 'maximal_backoff_time = 4000s' "
        "'smtpd_tls_cert_file = /etc/ssl/certs/mailserver.pem' "
        "'smtpd_tls_key_file = /etc/ssl/private/mailserver.key'; "
        f"postconf -M {' '.join(map(shlex.quote, master))}; "
        f"postconf -P {' '.join(map(shlex.quote, params))}",
    )
    # Postfix first: Debian 13's makes its private/ (Dovecot's sockets) on its first start
    started = sh(container, "systemctl restart postfix && systemctl restart dovecot", check=False)
    journal = "journalctl --no-pager -n 40 -u dovecot -u postfix@-"
    assert started.returncode == 0, sh(container, journal, check=False).stdout
    for port in (993, 465, 587):
        container.wait_for_port(port)


def deliver(container, accounts: list[dict]) -> None:
    """Each account's old mail through Postfix and Dovecot's LMTP, as it came in."""
    for account in accounts:
        for raw in account["messages"]:
            sh(container, f"/usr/sbin/sendmail -f x@{DOMAIN} {account['addr']}", input=raw.decode())
    count = sum(len(a["messages"]) for a in accounts)
    new = " ".join(f"{a['home']}/new" for a in accounts)
    listing = f"find {new} -type f 2>/dev/null | wc -l"
    deadline = time.monotonic() + 60
    while int(sh(container, listing, check=False).stdout) < count:
        assert time.monotonic() < deadline, sh(container, "postqueue -p; journalctl -n 30").stdout
        time.sleep(0.5)
    # Dovecot compressed them (zlib_save = gz / mail_compress_write_method = gz)
    heads = sh(
        container, f"find {new} -type f -exec sh -c 'head -c 2 \"$1\" | od -An -tx1' _ {{}} \\;"
    ).stdout.split()
    assert heads == ["1f", "8b"] * count, heads


def build_upstream_relay(container, suite: str) -> dict:
    """The container as cmdeploy left an upstream 1.12 relay (self-signed _-domain)."""
    sh(
        container,
        "set -e; export DEBIAN_FRONTEND=noninteractive; apt-get -q update >/dev/null; "
        "echo 'postfix postfix/main_mailer_type select Internet Site' | debconf-set-selections; "
        "echo 'postfix postfix/mailname string chatmail.test' | debconf-set-selections; "
        "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; "
        "apt-get -qy install --no-install-recommends postfix opendkim opendkim-tools fcgiwrap "
        "dovecot-core dovecot-imapd dovecot-lmtpd openssl python3-venv >/dev/null; "
        "rm /usr/sbin/policy-rc.d",
        timeout=900,
    )
    # upstream's pin keeps apt away from every other Dovecot (inventory 3.2)
    container.write_file(
        "/etc/apt/preferences.d/pin-dovecot",
        "Package: dovecot-*\nPin: version *\nPin-Priority: -1\n",
    )
    sh(container, "useradd --system --create-home --home-dir /home/vmail vmail")
    container.write_file(INI, UPSTREAM_INI)
    # upstream's venv: its own distribution, chatmaild 0.3
    sh(
        container,
        f"python3 -m venv {VENV} && mkdir -p {VENV}/lib/python3.$(python3 -c "
        f"'import sys; print(sys.version_info[1])')/site-packages/chatmaild-0.3.dist-info "
        "/usr/local/lib/chatmaild/dist && touch /usr/local/lib/chatmaild/dist/chatmaild-0.3.tar.gz",
    )
    # the DKIM key as upstream generates it, and the self-signed certificate
    sh(
        container,
        "set -e; mkdir -p /etc/dkimkeys; "
        f"opendkim-genkey -D /etc/dkimkeys -d {DOMAIN} -s opendkim; "
        "chown -R opendkim: /etc/dkimkeys; "
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -noenc -days 36500 "
        "-keyout /etc/ssl/private/mailserver.key -out /etc/ssl/certs/mailserver.pem "
        f"-subj /CN={DOMAIN} 2>/dev/null",
    )
    container.write_file("/etc/chatmail-nocreate", NOCREATE + "\n")
    accounts = [
        make_account(
            container,
            f"old{i}acct{i}",
            f"Old-Pass{i}-{uuid.uuid4().hex[:8]}",
            [encrypted_mail(f"x@{DOMAIN}", [f"old{i}acct{i}@{DOMAIN}"], message_id(DOMAIN))],
        )
        for i in range(3)
    ]
    # the Delta Chat client's two accounts (its messages are its own: it may delete them)
    dc_accounts = [
        make_account(container, f"dcold{i}acc", f"Dc-Pass{i}-{uuid.uuid4().hex[:8]}", [])
        for i in range(2)
    ]
    sh(container, f"chown -R vmail:vmail /home/vmail && chmod 700 {MAILBOXES}")
    # upstream's daemons: unit files, binaries (stand-ins), enabled and running
    units = []
    for unit, (binary, addr, port, proto) in UPSTREAM_DAEMONS.items():
        container.write_file(binary, STANDIN, mode="0755")
        container.write_file(
            f"/etc/systemd/system/{unit}",
            f"[Unit]\nDescription=upstream {unit}\n[Service]\n"
            f"ExecStart={binary} {addr} {port} {proto}\n"
            "Restart=always\n[Install]\nWantedBy=multi-user.target\n",
        )
        units.append(unit)
    for name, kind in UPSTREAM_ONESHOTS.items():
        container.write_file(
            f"/etc/systemd/system/{name}.service",
            f"[Unit]\nDescription=upstream {name}\n[Service]\nType=oneshot\nExecStart=/bin/true\n",
        )
        container.write_file(
            f"/etc/systemd/system/{name}.{kind}",
            f"[Unit]\nDescription=upstream {name}\n[Timer]\nOnCalendar=daily\n"
            "[Install]\nWantedBy=timers.target\n",
        )
        units.append(f"{name}.{kind}")
    for path, content in {
        "/etc/iroh-relay.toml": 'enable_relay = true\nhttp_bind_addr = "[::]:3340"\n',
        "/etc/mtail/delivered_mail.mtail": "counter delivered_mail\n",
        "/usr/lib/cgi-bin/newemail.py": "#!/usr/local/lib/chatmaild/venv/bin/python3\n",
        "/etc/dovecot/auth.conf": "uri = proxy:/run/doveauth/doveauth.socket:auth\n",
        "/etc/cron.d/expunge": "2 0 * * * vmail find /home/vmail/mail -mtime +20 -delete\n",
        "/etc/systemd/system/dovecot.service.d/10_restart.conf": "[Service]\nRestart=always\n",
        "/etc/systemd/system/opendkim.service.d/10-prevent-memory-leak.conf": (
            "[Service]\nRuntimeMaxSec=1d\n"
        ),
    }.items():
        container.write_file(path, content)
    sh(container, "systemctl daemon-reload && systemctl enable --now " + " ".join(units))
    sh(container, "systemctl enable --now fcgiwrap.socket")
    configure_mail(container, suite)
    deliver(container, accounts)
    # One recipient routed to a transport that is not there: its message waits in the
    # deferred queue, as mail does while Dovecot is down. The formula's main.cf has no
    # transport_maps, and --adopt flushes the queue.
    rcpt = accounts[0]["addr"]
    sh(
        container,
        f"postconf -e 'transport_maps = inline:{{{rcpt}=lmtp:unix:private/gone}}' "
        "&& postfix reload",
    )
    queued_id = message_id(DOMAIN)
    sh(
        container,
        f"/usr/sbin/sendmail -f x@{DOMAIN} {rcpt}",
        input=encrypted_mail(f"x@{DOMAIN}", [rcpt], queued_id).decode(),
    )
    deadline = time.monotonic() + 60
    while "deferred" not in sh(container, "postqueue -j", check=False).stdout:
        assert time.monotonic() < deadline, sh(container, "postqueue -p").stdout
        time.sleep(1)
    return {
        "accounts": accounts,
        "dc_accounts": dc_accounts,
        "queued": (rcpt, queued_id),
        "units": units,
    }


def snapshot(container, paths: list[str]) -> dict[str, str]:
    """sha256 and mtime of each file: what must survive unchanged."""
    out = sh(container, "stat -c '%n %Y' " + " ".join(map(shlex.quote, paths))).stdout
    hashes = sh(container, ["sha256sum", *paths]).stdout
    return {"stat": out, "sha256": hashes}


@pytest.fixture(scope="module")
def upstream(platform):
    if os.environ.get("CHATMAIL_TEST_REUSE"):
        pytest.skip("adoption needs a container of its own")
    relayctl.require_tools()
    # another session's container may still be letting go of the ports
    deadline = time.monotonic() + 900
    while relayctl.busy_ports() and time.monotonic() < deadline:
        time.sleep(2)
    relayctl.require_free_ports()
    SESSIONS_DIR.mkdir(parents=True, exist_ok=True)
    name = f"chatmail-adopt-{platform.suite}-{uuid.uuid4().hex[:8]}"
    source = SESSIONS_DIR / f"{name}.src"
    pidfile = SESSIONS_DIR / f"{name}.pid"
    pidfile.write_text(f"0 {os.getpid()}")
    relay = relayctl.Relay(
        SESSIONS_DIR / name, name=name, repo=source, pidfile=pidfile, suite=platform.suite
    )
    with relayctl.sigterm_as_interrupt():
        try:
            relayctl.snapshot_repo(REPO_ROOT, source)
            relay.unpack()
            relay.boot()
            state = build_upstream_relay(relay, platform.suite)
            kept = [f"{a['home']}/{f}" for a in state["accounts"] for f in
                    ("password", "enforceE2EEincoming", "metadata.json")]
            kept += ["/etc/dkimkeys/opendkim.private", "/etc/ssl/certs/mailserver.pem",
                     "/etc/ssl/private/mailserver.key"]
            state["kept"] = kept
            state["before"] = snapshot(relay, kept)
            state["relay"] = relay
            yield state
        finally:
            relay.destroy()
            relayctl.remove_tree(source)


def deploy(container, *args: str, timeout: float = 1800):
    return container.run(["/srv/chatmail/scripts/deploy", *args], check=False, timeout=timeout)


PILLAR = "/etc/chatmail/pillar/chatmail.sls"


@pytest.fixture(scope="module")
def dry_run(upstream):
    """`--adopt --dry-run`: writes the pillar and shows what the formula would do."""
    dry = deploy(upstream["relay"], "--adopt", "--dry-run")
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    return dry


def exchange(sender, receiver, text: str) -> None:
    """A message from one Delta Chat profile to another, end-to-end encrypted."""
    sender.create_chat(receiver).send_text(text)
    msg = receiver.wait_for_incoming_msg().get_snapshot()
    assert msg.text == text, msg.text
    assert msg.show_padlock, "arrived without end-to-end encryption"


@pytest.fixture(scope="module")
def client(upstream, tmp_path_factory):
    """A Delta Chat client set up on two old accounts before the switch, messages exchanged.
    It keeps running through the adoption, as a phone stays online."""
    relay = RelayClient(upstream["relay"], DOMAIN)
    rpc = start_rpc(tmp_path_factory.mktemp("deltachat") / "accounts")
    try:
        deltachat = DeltaChat(rpc)
        profiles = [
            online_account(deltachat, relay, a["addr"], a["password"])
            for a in upstream["dc_accounts"]
        ]
        exchange(profiles[0], profiles[1], "before the switch")
        exchange(profiles[1], profiles[0], "reply before the switch")
        yield {"deltachat": deltachat, "profiles": profiles}
    finally:
        rpc.close()


@pytest.fixture(scope="module")
def adopted(upstream, dry_run, client):
    container = upstream["relay"]
    # the test container needs the host's resolver as unbound's forwarder (as every e2e pillar)
    pillar = yaml.safe_load(container.read_file(PILLAR))
    upstream["pillar"] = json.loads(json.dumps(pillar))
    pillar["chatmail"]["dns_forwarder"] = relayctl.host_nameserver()
    container.write_file(PILLAR, yaml.safe_dump(pillar), mode="0600")
    started = time.monotonic()
    result = deploy(container, "--adopt")
    upstream["adopt_seconds"] = time.monotonic() - started
    print(f"\nadoption took {upstream['adopt_seconds']:.0f} s")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    container.wait_for_services()
    upstream["client"] = RelayClient(container, DOMAIN)
    return upstream


def test_adopting_with_opensmtpd_is_refused_before_anything_changes(upstream):
    """Upstream ran Postfix and its queue is kept: a pillar asking for OpenSMTPD is refused
    with one error line, before a pillar, config or unit is touched."""
    container = upstream["relay"]
    had_pillar = sh(container, ["test", "-e", PILLAR], check=False).returncode == 0
    original = container.read_file(PILLAR) if had_pillar else None
    container.write_file(PILLAR, f"chatmail:\n  mail_domain: {DOMAIN}\n  mta: opensmtpd\n")
    watched = [PILLAR, INI, "/etc/postfix/main.cf", "/etc/postfix/master.cf",
               "/etc/dovecot/dovecot.conf", "/etc/apt/preferences.d/pin-dovecot"]  # fmt: skip
    made_later = ["/etc/chatmail/upstream-chatmail.ini", "/etc/chatmail/salt/minion"]
    exist = f"for p in {' '.join(made_later)}; do test -e $p; echo $?; done"
    before = snapshot(container, watched), sh(container, exist).stdout
    try:
        for args in (["--adopt"], ["--adopt", "--dry-run"]):
            res = deploy(container, *args)
            errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
            assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
            assert len(errors) == 1 and errors == res.stderr.strip().splitlines()[-1:], res.stderr
            assert "mta: opensmtpd" in errors[0] and "Postfix" in errors[0]
        assert (snapshot(container, watched), sh(container, exist).stdout) == before
        for unit in ("postfix", "dovecot", "filtermail-transport.service"):
            assert sh(container, ["systemctl", "is-active", unit]).stdout.strip() == "active"
    finally:
        if original is None:
            sh(container, ["rm", "-f", PILLAR])
        else:
            container.write_file(PILLAR, original, mode="0600")


def test_dry_run_lists_what_goes_and_changes_nothing(upstream, dry_run):
    container = upstream["relay"]
    dry = dry_run
    for unit in ("filtermail-transport.service", "iroh-relay.service", "turnserver.service"):
        assert f"chatmail-upstream-unit-{unit}" in dry.stdout, dry.stdout[-5000:]
        assert sh(container, ["systemctl", "is-active", unit], check=False).stdout.strip() == (
            "active"
        )
    assert "/etc/iroh-relay.toml" in dry.stdout
    assert "note: mtail_address" in dry.stderr
    assert sh(container, f"test -d {VENV}/bin", check=False).returncode == 0
    assert snapshot(container, upstream["kept"]) == upstream["before"]


def test_pillar_keeps_the_operators_settings(adopted):
    chatmail = adopted["pillar"]["chatmail"]
    assert chatmail["mail_domain"] == DOMAIN
    assert chatmail["ipv6"] is False
    assert chatmail["settings"]["max_user_send_per_minute"] == 600
    assert chatmail["settings"]["delete_mails_after"] == 40
    assert chatmail["settings"]["privacy_mail"] == "privacy@example.org"
    assert "mtail_address" not in chatmail["settings"]
    ini = adopted["relay"].read_file(INI)
    assert "max_user_send_per_minute = 600" in ini
    assert "delete_mails_after = 40" in ini
    # upstream's own, for going back
    assert adopted["relay"].read_file("/etc/chatmail/upstream-chatmail.ini") == UPSTREAM_INI


def test_stored_state_is_kept_byte_for_byte(adopted):
    """Hashes, markers, push tokens, last-login mtimes, the DKIM key, the certificate."""
    assert snapshot(adopted["relay"], adopted["kept"]) == adopted["before"]


def test_upstream_units_and_files_are_gone(adopted):
    container = adopted["relay"]
    for unit in adopted["units"]:
        if unit in ("filtermail.service", "filtermail-incoming.service"):
            continue  # ours now, under upstream's names
        active = sh(container, ["systemctl", "is-active", unit], check=False).stdout.strip()
        enabled = sh(container, ["systemctl", "is-enabled", unit], check=False).stdout.strip()
        assert active in ("inactive", "unknown"), (unit, active)
        assert enabled not in ("enabled", "static"), (unit, enabled)
        assert sh(container, f"test -e /etc/systemd/system/{unit}", check=False).returncode == 1
    for path in LEFTOVERS["paths"]:
        assert sh(container, ["test", "-e", path], check=False).returncode == 1, path
    assert sh(container, "dpkg -s fcgiwrap", check=False).returncode != 0
    # Debian's Dovecot was installed with upstream's config: ours replaced it
    assert "Managed by Salt (chatmail formula)" in container.read_file("/etc/dovecot/dovecot.conf")
    # ours in upstream's place: the venv holds this checkout's distribution only
    upstream_dist = f"ls -d {VENV}/lib/python3*/site-packages/chatmaild-*"
    assert sh(container, upstream_dist, check=False).returncode
    for unit in ("filtermail.service", "filtermail-incoming.service"):
        exec_start = sh(container, ["systemctl", "show", "-p", "ExecStart", unit]).stdout
        assert f"{VENV}/bin/filtermail" in exec_start


def test_ports_upstream_held_are_free(adopted):
    """The container shares the host's network: a port nothing holds binds here."""
    for addr, port, proto in [d[1:] for d in UPSTREAM_DAEMONS.values()][2:]:
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is free
            probe.bind((addr, port))


def test_old_accounts_log_in_and_read_their_old_mail(adopted):
    relay = adopted["client"]
    for account in adopted["accounts"]:
        with relay.imap(account["addr"], account["password"]) as conn:
            conn.select("INBOX")
            _, data = conn.search(None, "ALL")
            fetched = [conn.fetch(n, "(RFC822)")[1][0][1] for n in data[0].split()]
            for message in account["messages"]:
                # as it was sent, below the trace headers Postfix and Dovecot put on top
                assert any(f.endswith(message) for f in fetched), (message[:300], fetched)
        with relay.smtp(587, account["addr"], account["password"]):
            pass


def test_queued_message_is_delivered(adopted):
    rcpt, msgid = adopted["queued"]
    password = next(a["password"] for a in adopted["accounts"] if a["addr"] == rcpt)
    raw = adopted["client"].fetch_inbox_message(rcpt, password, msgid, timeout=90)
    assert b"-----BEGIN PGP MESSAGE-----" in raw


def test_nocreate_switch_still_blocks_new_accounts(adopted):
    relay = adopted["client"]
    addr, password = relay.gencreds()
    with pytest.raises(Exception):
        with relay.imap(addr, password):
            pass
    text = adopted["relay"].run(["cat", "/etc/chatmail-nocreate"]).stdout
    assert "spam wave" in text


def set_account_creation(container, **body) -> dict:
    """PUT /account-creation on the control API with the relay's admin token."""
    container.wait_for_port(API_PORT)
    tokens = json.loads(container.read_file("/etc/chatmail/api-tokens.json"))
    ((_, admin),) = tokens["admin"].items()
    resp = httpx.put(
        f"http://127.0.0.1:{API_PORT}/account-creation",
        json=body,
        headers={"Authorization": f"Bearer {admin}"},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_delta_chat_client_keeps_working_across_the_switch(adopted, client):
    """The client set up before the switch, running through it, neither reconfigured nor
    restarted, sends to and receives from an account made after it."""
    container = adopted["relay"]
    deltachat = client["deltachat"]
    old = client["profiles"][0]
    assert old.get_config("configured_addr") == adopted["dc_accounts"][0]["addr"]
    deltachat.maybe_network()  # reconnect now, not at the end of its back-off
    # the operator reopens registration (upstream's nocreate file is kept closed)
    set_account_creation(container, enabled=True)
    try:
        new = online_account(deltachat, adopted["client"])
    finally:
        set_account_creation(container, enabled=False, reason=NOCREATE)
    exchange(old, new, "after the switch")
    exchange(new, old, "reply after the switch")


def test_certificate_served_is_upstreams(adopted):
    served = ssl.get_server_certificate((HOST, 993))
    pem = adopted["relay"].read_file("/etc/ssl/certs/mailserver.pem")
    assert ssl.PEM_cert_to_DER_cert(served) == ssl.PEM_cert_to_DER_cert(pem)


def test_mail_between_old_accounts_flows_and_is_stored_compressed(adopted):
    relay = adopted["client"]
    a, b = adopted["accounts"][1], adopted["accounts"][2]
    msgid = message_id(DOMAIN)
    message = encrypted_mail(a["addr"], [b["addr"]], msgid)
    relay.send(587, a["addr"], a["password"], [b["addr"]], message)
    relay.fetch_inbox_message(b["addr"], b["password"], msgid)
    newest = sh(adopted["relay"], f"ls -t {b['home']}/new/* {b['home']}/cur/* | head -1").stdout
    head = sh(adopted["relay"], ["head", "-c", "2", newest.strip()], text=False).stdout
    assert head == b"\x1f\x8b"


def test_second_apply_reports_no_changes(adopted):
    container = adopted["relay"]
    res = container.run(
        "/opt/salt/bin/salt-call --config-dir=/etc/chatmail/salt --local --out=json "
        "--retcode-passthrough state.apply chatmail",
        check=False,
        timeout=1800,
    )
    states = json.loads(res.stdout)["local"]
    changed = {k: v["changes"] for k, v in states.items() if v.get("changes")}
    assert res.returncode == 0 and not changed, json.dumps(changed)[:3000]
    digest = hashlib.sha256(res.stdout.encode()).hexdigest()[:8]
    print(f"\nsecond apply: {len(states)} states, 0 changed ({digest})")
