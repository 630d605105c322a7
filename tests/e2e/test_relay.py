"""End-to-end tests against the relay applied in a container (see conftest.py).

Every test talks to the real daemons (Postfix or OpenSMTPD, Dovecot, nginx, unbound, the
DKIM signer and the chatmaild services) over 127.0.0.1, as a client or another mail server
would, once per platform.
"""

from __future__ import annotations

import http.client
import imaplib
import json
import re
import smtplib
import socket
import ssl

import dkim
import pytest
import relayctl
from relayclient import (
    HOST,
    dkim_keypair,
    encrypted_mail,
    message_id,
    plain_mail,
    unverified_context,
)

# The first test also waits for the session's container: a base rootfs build on a new
# machine (~2 min) and the first apply (~2 min).
pytestmark = [pytest.mark.container, pytest.mark.timeout(1500)]


# --- accounts -----------------------------------------------------------------------------


def test_imap_login_creates_account_and_relogin_works(relay):
    addr, password = relay.gencreds()
    assert not relay.account_exists(addr)
    with relay.imap(addr, password) as conn:
        assert conn.select("INBOX")[0] == "OK"
    assert relay.account_exists(addr)
    with relay.imap(addr, password) as conn:
        assert conn.noop()[0] == "OK"


def test_smtp_login_creates_account(relay):
    addr, password = relay.gencreds()
    with relay.smtp(465, addr, password):
        pass
    assert relay.account_exists(addr)
    with relay.imap(addr, password):
        pass


def test_wrong_password_fails(relay):
    addr, password = relay.new_account()
    with pytest.raises(imaplib.IMAP4.error), relay.imap(addr, password + "x"):
        pass
    with pytest.raises(smtplib.SMTPAuthenticationError), relay.smtp(465, addr, password + "x"):
        pass


def test_short_password_fails_and_creates_nothing(relay):
    addr, _ = relay.gencreds()
    with pytest.raises(imaplib.IMAP4.error), relay.imap(addr, "admin"):
        pass
    assert not relay.account_exists(addr)


def test_nocreate_blocks_new_accounts_but_not_existing_ones(relay):
    existing, existing_password = relay.new_account()
    # The formula may keep /etc/chatmail-nocreate as a symlink the control API toggles:
    # create and remove what it points to, so the next apply finds its own state.
    nocreate = relay.container.run(["readlink", "-f", "/etc/chatmail-nocreate"]).stdout.strip()
    relay.container.run(["touch", nocreate])
    try:
        addr, password = relay.gencreds()
        with pytest.raises(imaplib.IMAP4.error), relay.imap(addr, password):
            pass
        assert not relay.account_exists(addr)
        with relay.imap(existing, existing_password):
            pass
    finally:
        relay.container.run(["rm", "-f", nocreate])
    with relay.imap(addr, password):
        pass


def test_imap_capabilities_and_metadata(relay):
    """Delta Chat's IMAP extensions: the capabilities it looks for, a settable device token."""
    addr, password = relay.new_account()
    with relay.imap(addr, password) as conn:
        caps = conn.capability()[1][0].split()
        assert b"XCHATMAIL" in caps and b"XDELTAPUSH" in caps and b"METADATA" in caps, caps
        typ, data = conn.xatom("SETMETADATA", "INBOX", '(/private/devicetoken "1111")')
        assert typ == "OK", data
        typ, data = conn.xatom("GETMETADATA", "INBOX", "/private/devicetoken")
        assert typ == "OK", data
        metadata = conn.untagged_responses.pop("METADATA", [])
        assert any(b"1111" in (m if isinstance(m, bytes) else m[1]) for m in metadata), metadata


def test_vrfy_reveals_nothing(relay):
    """VRFY answers an account, a non-account and a bare name alike (Postfix: 252 for all,
    OpenSMTPD: VRFY is not implemented), so it cannot enumerate accounts."""
    addr, _ = relay.new_account()
    with relay.smtp(25) as conn:
        codes = {who: conn.verify(who)[0] for who in (addr, f"nobody0x1@{relay.domain}", "echo")}
    assert len(set(codes.values())) == 1, codes
    assert not {250, 251} & set(codes.values()), codes


def test_operator_nocreate_toggle_survives_apply(relay):
    """`touch /etc/chatmail-nocreate`, later `rm` it: the next apply must not block again."""
    container = relay.container
    container.run("touch /etc/chatmail-nocreate && rm /etc/chatmail-nocreate")
    result = container.apply()
    assert result.ok, result.summary()
    addr, password = relay.gencreds()
    with relay.imap(addr, password):
        pass
    assert relay.account_exists(addr)


# --- submission ----------------------------------------------------------------------------


@pytest.mark.parametrize("port", [587, 465], ids=["587-starttls", "465-tls"])
def test_encrypted_mail_is_delivered(relay, port):
    sender, sender_pw = relay.new_account()
    rcpt, rcpt_pw = relay.new_account()
    msgid = message_id(relay.domain)
    relay.send(port, sender, sender_pw, [rcpt], encrypted_mail(sender, [rcpt], msgid))
    raw = relay.fetch_inbox_message(rcpt, rcpt_pw, msgid)
    assert b"-----BEGIN PGP MESSAGE-----" in raw
    headers = raw.split(b"\r\n\r\n", 1)[0].lower()
    # Postfix: signed on the way out, then stripped at final delivery like upstream (the
    # signature means nothing to the recipient's client); test_outgoing_mail_is_dkim_signed
    # checks the signature itself.
    assert (b"dkim-signature:" in headers) == relay.platform.dkim_signature_delivered
    assert headers.count(b"\ndelivered-to:") == 1, headers.decode()
    assert b"\nsubject: [...]" in headers


def test_outgoing_mail_is_dkim_signed(relay, unreachable_mx):
    """Encrypted mail to another domain passes, and leaves signed for d=<our domain>."""
    sender, sender_pw = relay.new_account()
    remote = "someone@_remote.test"
    # An MX that never answers: the mail waits in the queue, where we read it.
    relay.local_data("_remote.test. 300 IN MX 10 mx._remote.test.")
    relay.local_data(f"mx._remote.test. 300 IN A {unreachable_mx}")
    msgid = message_id(relay.domain)
    relay.send(587, sender, sender_pw, [remote], encrypted_mail(sender, [remote], msgid))
    queue_id, raw = relay.queued_message(remote)
    try:
        message = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        assert msgid.encode() in message
        signature = dkim.DKIM(message)
        public = relay.dkim_public_txt().encode()
        assert signature.verify(dnsfunc=lambda name, timeout=5: public), message[:2000]
        assert signature.domain == relay.domain.encode()
    finally:
        relay.delete_queued(queue_id)


def test_unencrypted_mail_to_outside_is_refused_523(relay):
    sender, sender_pw = relay.new_account()
    remote = "someone@_remote.test"
    with pytest.raises(smtplib.SMTPDataError) as exc:
        relay.send(
            587, sender, sender_pw, [remote], plain_mail(sender, [remote], message_id(relay.domain))
        )
    assert exc.value.smtp_code == 523, exc.value


def test_mail_from_other_than_login_is_refused(relay):
    sender, sender_pw = relay.new_account()
    other, _ = relay.new_account()
    rcpt, _ = relay.new_account()
    msg = encrypted_mail(other, [rcpt], message_id(relay.domain))
    with pytest.raises((smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused)) as exc:
        relay.send(587, sender, sender_pw, [rcpt], msg, mail_from=other)
    if isinstance(exc.value, smtplib.SMTPRecipientsRefused):
        code, text = exc.value.recipients[rcpt]
    else:
        code, text = exc.value.smtp_code, exc.value.smtp_error
    assert code == relay.platform.sender_mismatch_code, text


@pytest.mark.parametrize("forged", ["internal", "someone@example.org"])
def test_from_header_other_than_mail_from_is_refused_500(relay, forged):
    sender, sender_pw = relay.new_account()
    rcpt, _ = relay.new_account()
    from_addr = relay.new_account()[0] if forged == "internal" else forged
    msg = encrypted_mail(from_addr, [rcpt], message_id(relay.domain))
    with pytest.raises(smtplib.SMTPDataError) as exc:
        relay.send(465, sender, sender_pw, [rcpt], msg)
    assert exc.value.smtp_code == 500, exc.value


# --- port 25: mail from other servers ------------------------------------------------------


def send_port25(relay, from_addr: str, rcpt: str, msg: bytes) -> None:
    with relay.smtp(25) as conn:
        conn.sendmail(from_addr, [rcpt], msg)


def test_port25_refuses_unsigned_mail(relay):
    rcpt, _ = relay.new_account()
    sender = "alice@_sender-unsigned.test"
    msg = encrypted_mail(sender, [rcpt], message_id("_sender-unsigned.test"))
    with pytest.raises(smtplib.SMTPDataError) as exc:
        send_port25(relay, sender, rcpt, msg)
    assert exc.value.smtp_code // 100 == 5 and b"5.7.1" in exc.value.smtp_error, exc.value


def test_port25_accepts_mail_signed_with_published_key(relay):
    rcpt, rcpt_pw = relay.new_account()
    domain, selector = "_sender.test", "sel2026"
    private_pem, public_b64 = dkim_keypair()
    relay.publish_txt(f"{selector}._domainkey.{domain}", f"v=DKIM1; k=rsa; p={public_b64}")
    sender = f"alice@{domain}"
    msgid = message_id(domain)
    msg = encrypted_mail(sender, [rcpt], msgid)
    signature = dkim.sign(
        msg,
        selector.encode(),
        domain.encode(),
        private_pem,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id", b"content-type"],
    )
    send_port25(relay, sender, rcpt, signature + msg)
    raw = relay.fetch_inbox_message(rcpt, rcpt_pw, msgid)
    assert b"-----BEGIN PGP MESSAGE-----" in raw

    # The same message altered after signing is refused.
    tampered = signature + msg.replace(b"Subject: ...", b"Subject: ..!")
    with pytest.raises(smtplib.SMTPDataError) as exc:
        send_port25(relay, sender, rcpt, tampered)
    assert b"5.7.1" in exc.value.smtp_error, exc.value


def test_port25_requires_starttls(relay):
    rcpt, _ = relay.new_account()
    with smtplib.SMTP(HOST, 25, timeout=30) as conn:
        conn.ehlo("other.example")
        code, _ = conn.mail("alice@_sender.test")
        if code == 250:
            code, _ = conn.rcpt(rcpt)
        assert code // 100 == 5


# --- port 443: ALPN routing, web, autoconfig ------------------------------------------------


def tls_greeting(alpn: str) -> tuple[str | None, bytes]:
    ctx = unverified_context()
    ctx.set_alpn_protocols([alpn])
    with socket.create_connection((HOST, 443), timeout=15) as raw, ctx.wrap_socket(raw) as conn:
        return conn.selected_alpn_protocol(), conn.recv(200)


def test_443_alpn_imap_reaches_dovecot(relay):
    _, greeting = tls_greeting("imap")
    assert greeting.startswith(b"* OK"), greeting


def test_443_alpn_smtp_reaches_the_mta(relay):
    _, greeting = tls_greeting("smtp")
    assert greeting.startswith(b"220 "), greeting


def test_443_alpn_imap_login_works(relay):
    addr, password = relay.new_account()
    ctx = unverified_context()
    ctx.set_alpn_protocols(["imap"])
    conn = imaplib.IMAP4_SSL(HOST, 443, ssl_context=ctx, timeout=30)
    try:
        assert conn.login(addr, password)[0] == "OK"
    finally:
        conn.logout()


def test_https_web_page(relay):
    status, _, body = relay.https_get("/")
    assert status == 200
    assert b"<html" in body.lower()


def test_http_redirects_to_https(relay):
    conn = http.client.HTTPConnection(HOST, 80, timeout=15)
    conn.request("GET", "/", headers={"Host": relay.domain})
    resp = conn.getresponse()
    assert resp.status in (301, 302, 308)
    assert resp.getheader("Location", "").startswith("https://")


def test_autoconfig_xml(relay):
    for path in ("/.well-known/autoconfig/mail/config-v1.1.xml", "/mail/config-v1.1.xml"):
        status, _, body = relay.https_get(path)
        assert status == 200, path
        text = body.decode()
        assert f"<domain>{relay.domain}</domain>" in text
        assert "<port>993</port>" in text and "<port>465</port>" in text


def test_mta_sts_txt(relay):
    status, _, body = relay.https_get("/.well-known/mta-sts.txt", host=f"mta-sts.{relay.domain}")
    assert status == 200
    text = body.decode()
    assert "version: STSv1" in text and "mode: enforce" in text
    assert f"mx: {relay.domain}" in text


def test_new_account_endpoint(relay):
    status, _, body = relay.https_get("/new", method="POST")
    assert status == 200, body
    creds = json.loads(body)
    assert creds["email"].endswith(f"@{relay.domain}")
    with relay.imap(creds["email"], creds["password"]):
        pass


def post_new_from(source: str, domain: str) -> int:
    conn = http.client.HTTPSConnection(
        HOST, 443, context=unverified_context(), timeout=30, source_address=(source, 0)
    )
    try:
        conn.request("POST", "/new", headers={"Host": domain})
        return conn.getresponse().status
    finally:
        conn.close()


def test_new_is_limited_per_client_through_443(relay):
    """The 443 switch passes each client's address (PROXY header): one client past the
    rate limit leaves another's bucket alone. Before, every client was 127.0.0.1."""
    statuses = [post_new_from("127.0.0.2", relay.domain) for _ in range(12)]
    assert statuses[0] == 200 and 429 in statuses, statuses
    assert post_new_from("127.0.0.1", relay.domain) == 200


def test_health_through_443_is_not_local(relay):
    """Through nginx nobody is the relay's own monitoring, even from 127.0.0.1."""
    status, _, body = relay.https_get("/health")
    assert status != 200, body


@pytest.mark.on_platforms("debian12-postfix", "debian13-postfix")
def test_postfix_services_run_chrooted(relay):
    """Mail flows (the tests above) while smtpd, cleanup, smtp and lmtp run chrooted in
    the queue directory, whose resolv.conf is the relay's (unbound)."""
    container = relay.container
    chroot = container.run(["postconf", "-F", "25/inet/chroot", "smtp/unix/chroot"]).stdout
    assert chroot.split() == ["25/inet/chroot", "=", "y", "smtp/unix/chroot", "=", "y"]
    assert container.read_file("/var/spool/postfix/etc/resolv.conf") == container.read_file(
        "/etc/resolv.conf"
    )
    with socket.create_connection((HOST, 25), timeout=15) as conn:
        assert conn.recv(200).startswith(b"220 ")  # an smtpd serves this connection
        # master starts port 25's smtpd as "smtpd -n 25 ..." (the reinjection listeners'
        # smtpd, -n 127.0.0.1:<port>, stay outside the chroot); $n keeps this shell's
        # own command line from matching
        roots = container.run(
            "n=25; for p in /proc/[0-9]*; do case $(tr '\\0' ' ' <$p/cmdline) in"
            ' "smtpd -n $n "*|*"/smtpd -n $n "*) readlink $p/root;; esac; done 2>/dev/null; true'
        ).stdout.split()
    assert roots and set(roots) == {"/var/spool/postfix"}, roots


def test_tls_versions(relay):
    """Submission and IMAPS refuse TLS 1.2 (TLS 1.3 only, like upstream)."""
    ctx = unverified_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    for port in (465, 993):
        with socket.create_connection((HOST, port), timeout=15) as raw, pytest.raises(ssl.SSLError):
            ctx.wrap_socket(raw)


# --- a pillar change reaches the running daemons ------------------------------------------


def test_pillar_change_restarts_what_uses_it(relay, relay_pillar):
    container = relay.container
    filter_unit = relay.platform.filter_unit

    def started_at(unit: str) -> str:
        return container.run(
            ["systemctl", "show", "-p", "ActiveEnterTimestampMonotonic", "--value", unit]
        ).stdout.strip()

    def advertised_size() -> str:
        with relay.smtp(587) as conn:
            conn.ehlo("client.example")
            return conn.esmtp_features["size"]

    before = started_at(filter_unit)
    container.configure_salt(relay_pillar(max_message_size=20000000))
    try:
        result = container.apply()
        assert result.ok, result.summary()
        assert advertised_size() == "20000000"
        assert "max_message_size = 20000000" in container.read_file(
            "/usr/local/lib/chatmaild/chatmail.ini"
        )
        assert started_at(filter_unit) != before, f"{filter_unit} kept the old settings"
    finally:
        container.configure_salt(relay_pillar())
        result = container.apply()
    assert result.ok, result.summary()
    assert advertised_size() == "31457280"


def test_self_mode_on_an_ordinary_domain_hands_out_accounts(relay, relay_pillar):
    """``tls: mode: self`` on a domain without ``_`` (pillar.example offers it): nginx passes
    GET /new on and the API, told the mode by chatmail.ini, answers with credentials
    instead of the ``dcaccount:`` redirect meant for acme relays."""
    container = relay.container
    domain = "chat.e2e.test"
    pillar = relay_pillar()
    pillar["chatmail"]["mail_domain"] = domain
    container.configure_salt(pillar)
    try:
        result = container.apply()
        assert result.ok, result.summary()
        ini = container.read_file("/usr/local/lib/chatmaild/chatmail.ini").splitlines()
        assert "tls_mode = self" in ini
        status, _, body = relay.https_get("/new", host=domain)
        assert status == 200, body
        creds = json.loads(body)
        assert creds["email"].endswith(f"@{domain}") and "ic=3" in creds["dclogin_url"]
    finally:
        container.configure_salt(relay_pillar())
        result = container.apply()
    assert result.ok, result.summary()


# --- idempotence (last: it must see the state every test above left) -----------------------


def test_second_apply_reports_no_changes(applied):
    result = applied.apply()
    print(
        f"\nsecond apply: {result.seconds:.1f} s "
        f"(first: {applied.first_apply.seconds:.1f} s)\n{result.summary()}"
    )
    assert result.ok, result.summary()
    assert not result.changed, result.changed_summary()


# --- scripts/deploy DOMAIN on a host that already is the relay -----------------------------


def test_deploy_script_server_mode_honours_existing_pillar(relay, relay_pillar):
    """`scripts/deploy DOMAIN` run on the relay itself: its own masterless Salt setup,
    the operator's pillar kept, and nothing to change."""
    applied, DOMAIN = relay.container, relay.domain
    pillar = json.dumps(relay_pillar())
    applied.write_file("/etc/chatmail/pillar/chatmail.sls", pillar, mode="0600")
    res = applied.run([f"{relayctl.REPO_MOUNT}/scripts/deploy", DOMAIN], check=False, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert "using the existing pillar" in out
    assert re.search(r"Failed:\s+0\b", out) and "changed=" not in out, out[-3000:]

    other = applied.run([f"{relayctl.REPO_MOUNT}/scripts/deploy", "other.example"], check=False)
    assert other.returncode == 2
    assert f"is for mail_domain '{DOMAIN}', not 'other.example'" in other.stderr


def test_deploy_script_refuses_non_root(relay):
    res = relay.container.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            f"{relayctl.REPO_MOUNT}/scripts/deploy",
            "chat.example.org",
        ],
        check=False,
    )
    assert res.returncode == 2
    assert "run this as root" in res.stderr
