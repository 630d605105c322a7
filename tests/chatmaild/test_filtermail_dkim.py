"""Incoming DKIM verification: keys served by a real NSD on loopback, signatures by dkimpy."""

from __future__ import annotations

import base64
import logging
import socket
import subprocess

import dkim
import pytest
from dnsserver import txt_strings
from filtermail_support import Filtermail, LoopThread, Sink, load_mail, send
from hypothesis import given, settings
from hypothesis import strategies as st

from chatmaild.dkimverify import (
    MAX_ALIGNED_SIGNATURES,
    TxtLookup,
    parse_resolver_address,
    split_for_dkimpy,
)

RCPT = "dave@chat.example.org"
SENDER = "bob@example.org"


def generate_key() -> tuple[bytes, str]:
    """(private key PEM, base64 DER public key) made by openssl."""
    private = subprocess.run(
        ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        check=True,
        capture_output=True,
    ).stdout
    public = subprocess.run(
        ["openssl", "pkey", "-pubout", "-outform", "DER"],
        input=private,
        check=True,
        capture_output=True,
    ).stdout
    return private, base64.b64encode(public).decode()


@pytest.fixture(scope="module")
def keys():
    return [generate_key() for _ in range(2)]


def key_record(selector: str, public: str) -> str:
    return f"{selector}._domainkey TXT " + txt_strings(f"v=DKIM1; k=rsa; p={public}")


def sign(data: bytes, private: bytes, domain: str, selector: str = "sel") -> bytes:
    signature = dkim.sign(
        data,
        selector.encode(),
        domain.encode(),
        private,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return signature + data


@pytest.fixture
def nsd(dns_server, keys):
    """The module's NSD serving example.org and other.org with their first keys."""
    dns_server.set_zone("example.org", [key_record("sel", keys[0][1])])
    dns_server.set_zone("other.org", [key_record("sel", keys[1][1])])
    return dns_server


@pytest.fixture
def incoming(nsd, keys, make_config):
    """A running incoming filter resolving through NSD, plus its sink."""
    loop_thread = LoopThread()
    sink = Sink(loop_thread)
    config = make_config(dns_resolver=nsd.address, postfix_reinject_port_incoming=sink.port)
    fm = Filtermail(loop_thread, config, "incoming")
    yield fm, sink
    fm.stop()
    sink.stop()
    loop_thread.stop()


def test_valid_aligned_signature_passes(incoming, keys):
    fm, sink = incoming
    data = sign(load_mail("encrypted", SENDER, RCPT), keys[0][0], "example.org")
    assert send(fm.port, SENDER, [RCPT], data)[0] == 250
    assert sink.received[0].content == data


def test_domain_comparison_is_case_insensitive(incoming, keys):
    fm, _ = incoming
    data = sign(load_mail("encrypted", "Bob <bob@EXAMPLE.Org>", RCPT), keys[0][0], "Example.ORG")
    assert send(fm.port, SENDER, [RCPT], data)[0] == 250


def test_no_signature(incoming):
    fm, sink = incoming
    data = load_mail("encrypted", SENDER, RCPT)
    assert send(fm.port, SENDER, [RCPT], data) == (554, "5.7.1 No DKIM signature found")
    assert sink.received == []


def test_signature_of_another_domain_is_not_aligned(incoming, keys):
    fm, sink = incoming
    data = sign(load_mail("encrypted", SENDER, RCPT), keys[1][0], "other.org")
    other_key = f"v=DKIM1; k=rsa; p={keys[1][1]}".encode()
    assert dkim.verify(data, dnsfunc=lambda name, timeout=5: other_key)  # valid, for other.org
    assert send(fm.port, SENDER, [RCPT], data) == (554, "5.7.1 No valid DKIM signature found")
    assert sink.received == []


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d.replace(b"hQEMAyDQmyyKtDMb", b"hQEMAyDQmyyKtDMc"),
        lambda d: d.replace(b"Subject: test", b"Subject: tesT"),
        lambda d: d + b"appended\r\n",
    ],
    ids=["body", "signed-header", "appended"],
)
def test_tampered_message_fails(incoming, keys, tamper):
    fm, sink = incoming
    data = tamper(sign(load_mail("encrypted", SENDER, RCPT), keys[0][0], "example.org"))
    assert send(fm.port, SENDER, [RCPT], data) == (554, "5.7.1 No valid DKIM signature found")
    assert sink.received == []


def test_wrong_key_and_unpublished_selector_fail(incoming, keys):
    fm, _ = incoming
    wrong_key = sign(load_mail("encrypted", SENDER, RCPT), keys[1][0], "example.org")
    assert send(fm.port, SENDER, [RCPT], wrong_key)[0] == 554
    no_key = sign(load_mail("encrypted", SENDER, RCPT), keys[0][0], "example.org", selector="gone")
    assert send(fm.port, SENDER, [RCPT], no_key) == (554, "5.7.1 No valid DKIM signature found")


def test_any_aligned_valid_signature_wins(incoming, keys):
    fm, _ = incoming
    data = load_mail("encrypted", SENDER, RCPT)
    signed = sign(data, keys[0][0], "example.org")
    signed = sign(signed, keys[1][0], "other.org")  # unaligned one on top
    broken = sign(data, keys[1][0], "example.org")  # aligned but the wrong key
    signed = broken.split(b"\r\n\r\n")[0].split(b"From:")[0] + signed
    assert signed.count(b"DKIM-Signature") == 3
    assert send(fm.port, SENDER, [RCPT], signed)[0] == 250


def test_rotated_key_is_fetched_again(incoming, keys, nsd):
    fm, _ = incoming
    assert (
        send(
            fm.port,
            SENDER,
            [RCPT],
            sign(load_mail("encrypted", SENDER, RCPT), keys[0][0], "example.org"),
        )[0]
        == 250
    )
    nsd.set_zone("example.org", [key_record("sel", keys[1][1])])  # cached: keys[0]
    data = sign(load_mail("encrypted", SENDER, RCPT), keys[1][0], "example.org")
    assert send(fm.port, SENDER, [RCPT], data)[0] == 250


def test_cleartext_is_refused_before_dkim(incoming, make_config, caplog):
    fm, _ = incoming
    mailbox = make_config().mailboxes_path / RCPT
    mailbox.mkdir(parents=True)
    (mailbox / "enforceE2EEincoming").touch()
    assert send(fm.port, SENDER, [RCPT], load_mail("plain", SENDER, RCPT))[0] == 523


def test_domain_literal_sender_skips_dkim(incoming):
    fm, _ = incoming
    sender = "bob@[192.0.2.1]"
    assert send(fm.port, sender, [RCPT], load_mail("encrypted", sender, RCPT))[0] == 250


@pytest.mark.parametrize("sender", ["bob@[192.0.2.999]", "bob@[IPv6:nope]"])
def test_bracketed_non_ip_sender_needs_dkim(incoming, sender):
    """Only real IP addresses are IP-address relays; other bracketed text needs DKIM."""
    fm, _ = incoming
    reply = send(fm.port, sender, [RCPT], load_mail("encrypted", sender, RCPT))
    assert reply[0] == 554


def test_signature_with_length_must_cover_the_body(incoming, keys):
    """``l=`` lets anyone append to a signed body: only a signature of all of it counts."""
    fm, sink = incoming
    signed = dkim.sign(load_mail("encrypted", SENDER, RCPT), b"sel", b"example.org",
                       keys[0][0], include_headers=[b"from", b"to", b"subject"],
                       length=True) + load_mail("encrypted", SENDER, RCPT)  # fmt: skip
    assert b" l=" in signed or b";l=" in signed or b"\tl=" in signed
    assert send(fm.port, SENDER, [RCPT], signed)[0] == 250
    appended = signed + b"Appended cleartext\r\n"
    assert send(fm.port, SENDER, [RCPT], appended)[0] == 554
    assert len(sink.received) == 1


def test_dns_outage_is_temporary(keys, make_config, caplog):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))  # bound but never answering: every query times out
        loop_thread = LoopThread()
        sink = Sink(loop_thread)
        config = make_config(
            dns_resolver=f"127.0.0.1:{s.getsockname()[1]}", postfix_reinject_port_incoming=sink.port
        )
        fm = Filtermail(loop_thread, config, "incoming")
        fm.handler.dkim.txt.resolver.lifetime = 1.0
        try:
            with caplog.at_level(logging.WARNING, logger="chatmaild.dkimverify"):
                data = sign(load_mail("encrypted", SENDER, RCPT), keys[0][0], "example.org")
                code, text = send(fm.port, SENDER, [RCPT], data)
            assert code == 451 and "DNS" in text
            assert "DKIM key lookup failed" in caplog.text
        finally:
            fm.stop()
            sink.stop()
            loop_thread.stop()


@pytest.mark.parametrize(
    "value,expected",
    [
        ("", None),
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("::1", ("::1", 53)),
        ("[::1]:5353", ("::1", 5353)),
    ],
)
def test_parse_resolver_address(value, expected):
    assert parse_resolver_address(value) == expected


def test_txt_cache_is_bounded(dns_server):
    dns_server.set_zone("cache.example", [f'k{i} TXT "v{i}"' for i in range(20)])

    async def run():
        txt = TxtLookup(dns_server.address, cache_size=5)
        values = [await txt.lookup(f"k{i}.cache.example") for i in range(20)]
        missing = await txt.lookup("nothing.cache.example")
        return values, missing, len(txt._cache)

    loop_thread = LoopThread()
    try:
        values, missing, size = loop_thread.run(run())
    finally:
        loop_thread.stop()
    assert values == [f"v{i}".encode() for i in range(20)]
    assert missing is None
    assert size == 5


def test_only_the_first_aligned_signatures_are_tried(incoming, keys):
    """Each signature costs a DNS lookup and a hash of the whole body: a message piling up
    aligned signatures must not make the filter do unbounded work."""
    fm, sink = incoming
    signed = sign(load_mail("encrypted", SENDER, RCPT), keys[0][0], "example.org")
    for i in range(MAX_ALIGNED_SIGNATURES):  # unpublished selectors, on top of the valid one
        signed = sign(signed, keys[0][0], "example.org", selector=f"junk{i}")
    assert send(fm.port, SENDER, [RCPT], signed) == (554, "5.7.1 No valid DKIM signature found")
    assert sink.received == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"From: a@b.org", b"X: y", b" folded", b"", b"body .",
                                 b"\r", b"--b", b"  "]), max_size=12),
       st.lists(st.sampled_from([b"\r\n", b"\n"]), min_size=12, max_size=12))  # fmt: skip
def test_split_for_dkimpy_is_dkimpys_division(lines, breaks):
    """Header section and body as dkimpy's own parser makes them from the whole message."""
    message = b"".join(line + brk for line, brk in zip(lines, breaks))
    try:
        expected = dkim.rfc822_parse(message)
    except (dkim.MessageFormatError, IndexError):  # IndexError: dkimpy, folded first line
        return
    header, body = split_for_dkimpy(message)
    assert dkim.rfc822_parse(header) == (expected[0], b"")
    assert body == expected[1]


def test_large_signed_message_memory(keys):
    """Verifying a signed body of millions of short lines costs about its size once more
    (dkimpy on the whole message: ~28x)."""
    import tracemalloc

    from chatmaild.dkimverify import _verify_signatures, aligned_signatures

    data = sign(b"From: <bob@example.org>\r\nSubject: x\r\n\r\n" + b"--b\r\n" * 1_000_000,
                keys[0][0], "example.org")  # fmt: skip
    header = data.split(b"\r\n\r\n", 1)[0].decode()
    signature = header.split("DKIM-Signature:", 1)[1].split("\r\nFrom:", 1)[0]
    signatures = aligned_signatures([signature], "example.org")
    key = f"v=DKIM1; k=rsa; p={keys[0][1]}".encode()
    tracemalloc.start()
    try:
        assert _verify_signatures(data, signatures, {"sel._domainkey.example.org": key})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(data), peak
