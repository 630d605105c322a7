"""Compressed mail files: upstream relays store every message gzip-compressed (Dovecot's
zlib plugin, ``zlib_save = gz``; ``mail_compress`` on 2.4). A relay taken over keeps those
files, so Dovecot must read them, and it stores new mail the same way.
"""

from __future__ import annotations

import gzip
import shlex
import time

import pytest
from relayclient import encrypted_mail, message_id

pytestmark = [pytest.mark.container, pytest.mark.timeout(1500)]


def put_mail_file(relay, addr: str, name: str, content: bytes) -> None:
    """A file in the account's INBOX cur/, written as a delivery would (tmp/, then rename)."""
    home = relay.mailbox_dir(addr)
    tmp, final = f"{home}/tmp/{name}", f"{home}/cur/{name}"
    # a first login creates the account; Dovecot makes the Maildir on first use
    relay.container.run(
        f"install -d -o vmail -g vmail -m 0700 {home}/cur {home}/new {home}/tmp && "
        f"cat > {shlex.quote(tmp)} && chown vmail:vmail {shlex.quote(tmp)} && "
        f"chmod 0600 {shlex.quote(tmp)} && mv {shlex.quote(tmp)} {shlex.quote(final)}",
        input=content,
        text=False,
    )


def test_gz_mail_file_as_upstream_stores_it_is_fetched_intact(relay):
    addr, password = relay.new_account()
    msgid = message_id(relay.domain)
    raw = encrypted_mail(f"other@{relay.domain}", [addr], msgid)
    # on disk as Dovecot writes maildir files: LF line ends, S= their size, W= with CRLF
    on_disk = raw.replace(b"\r\n", b"\n")
    name = f"{int(time.time())}.M1P1.upstream,S={len(on_disk)},W={len(raw)}:2,S"
    put_mail_file(relay, addr, name, gzip.compress(on_disk))
    with relay.imap(addr, password) as conn:
        conn.select("INBOX")
        _, data = conn.search(None, "HEADER", "Message-ID", msgid)
        (num,) = data[0].split()
        _, fetched = conn.fetch(num, "(RFC822.SIZE RFC822)")
        assert fetched[0][1] == raw
        assert f"RFC822.SIZE {len(raw)}".encode() in fetched[0][0]
        # the session goes on (a raw read of a gz file breaks it and drops the cache record)
        _, header = conn.fetch(num, "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        assert msgid.encode() in header[0][1]
        assert conn.noop()[0] == "OK"


def test_new_mail_is_stored_compressed(relay):
    sender, sender_pw = relay.new_account()
    rcpt, rcpt_pw = relay.new_account()
    msgid = message_id(relay.domain)
    relay.send(587, sender, sender_pw, [rcpt], encrypted_mail(sender, [rcpt], msgid, size=20000))
    fetched = relay.fetch_inbox_message(rcpt, rcpt_pw, msgid)
    home = relay.mailbox_dir(rcpt)
    names = relay.container.run(f"ls {home}/new {home}/cur | grep ,S=").stdout.split()
    assert len(names) == 1, names
    path = relay.container.run(f"ls -d {home}/new/* {home}/cur/* | grep ,S=").stdout.strip()
    stored = relay.container.run(["cat", path], text=False).stdout
    assert stored[:2] == b"\x1f\x8b", "stored raw, not gzip-compressed"
    plain = gzip.decompress(stored)
    assert plain.replace(b"\n", b"\r\n") == fetched
    # S= is the uncompressed size: Dovecot's quota and chatmail-expire's trim read it
    assert f",S={len(plain)}" in names[0]
    print(f"\nstored {len(stored)} bytes for a {len(plain)}-byte message"
          f" ({len(stored) / len(plain):.2f} of it)")
