"""Message classification (pure functions) and robustness against arbitrary MIME input."""

from __future__ import annotations

import asyncio
import smtplib
from email.policy import default as default_policy

import pytest
from filtermail_support import Filtermail, LoopThread, Sink, encrypted_mail, load_mail
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatmaild.config import parse_params
from chatmaild.mailcheck import (
    _SIMPLE_FROM,
    MalformedMessage,
    from_address,
    is_autocrypt_setup_message,
    is_encrypted,
    is_mailer_daemon_report,
    is_securejoin,
    is_utf8,
    parse_mail,
    single_address,
    split_multipart,
)

A, B = "alice@chat.example.org", "bob@other.example"

# name: (encrypted outgoing, encrypted incoming, securejoin, self-sent ASM, mailer-daemon)
CORPUS = {
    "encrypted": (True, True, False, False, False),
    "encrypted-symmetric": (True, True, False, False, False),
    "encrypted-partial": (True, True, False, False, False),
    "fake-encrypted": (False, False, False, False, False),
    "literal": (False, False, False, False, False),
    "plain": (False, False, False, False, False),
    "mdn": (False, False, False, False, False),
    "securejoin-vc": (False, False, True, False, False),
    "securejoin-vc-fake": (False, False, False, False, False),
    "asm": (False, False, False, True, False),
    "mailer-daemon": (False, False, False, False, True),
}


@pytest.mark.parametrize("name,expected", CORPUS.items(), ids=CORPUS.keys())
def test_corpus(name, expected):
    mail = parse_mail(load_mail(name, A, A))
    sender = from_address(mail)
    assert (
        is_encrypted(mail, outgoing=True),
        is_encrypted(mail, outgoing=False),
        is_securejoin(mail),
        is_autocrypt_setup_message(mail, sender, [A]),
        is_mailer_daemon_report(mail, sender),
    ) == expected


def test_securejoin_vg_request_and_case():
    data = load_mail("securejoin-vc", A, B).replace(b"vc-request", b"vg-request")
    assert is_securejoin(
        parse_mail(data.replace(b"Secure-Join: vg-request\r\n--", b"SECURE-JOIN: VG-REQUEST\r\n--"))
    )
    assert not is_securejoin(
        parse_mail(data.replace(b"Secure-Join: vg-request\r\n", b"Secure-Join: vc-auth\r\n", 1))
    )


@pytest.mark.parametrize(
    "change",
    [
        (b"Content-Type: application/pgp-encrypted", b"Content-Type: text/plain"),
        (b"Version: 1", b"Version: 2"),
        (b"Content-Type: application/octet-stream", b"Content-Type: text/plain"),
        (b"multipart/encrypted", b"multipart/mixed"),
        (
            b"--Xb8nFq2Wt0--",
            b"--Xb8nFq2Wt0\r\nContent-Type: text/plain\r\n\r\nBuy now!\r\n--Xb8nFq2Wt0--",
        ),
        (b"--Xb8nFq2Wt0--", b"--Xb8nFq2Wt0"),
        (b"MIME-Version: 1.0\r\n", b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n"),
    ],
    ids=[
        "version-part-type",
        "version-text",
        "payload-type",
        "not-encrypted-type",
        "third-part",
        "no-closing-boundary",
        "second-content-type",
    ],
)
def test_encrypted_structure_violations(change):
    data = encrypted_mail(A, B, size=3000)
    assert is_encrypted(parse_mail(data), outgoing=True)
    changed = data.replace(*change)
    assert changed != data
    assert not is_encrypted(parse_mail(changed), outgoing=True)


def test_split_multipart():
    body = memoryview(b"preamble\r\n--b\r\nA\r\n--b \r\n\r\nB\r\n--bb\r\n--b--\r\nepilogue")
    assert [bytes(p) for p in split_multipart(body, "b")] == [b"A", b"\r\nB\r\n--bb"]
    assert split_multipart(memoryview(b"--b\r\nA\r\n"), "b") is None
    assert split_multipart(memoryview(b"--b--\r\n"), "b") is None
    assert split_multipart(memoryview(b"x"), "") is None


@pytest.mark.parametrize(
    "value,expected",
    [
        ("alice@x.org", "alice@x.org"),
        ("Alice <alice@x.org>", "alice@x.org"),
        ('"Bob, the builder" <bob@x.org>', "bob@x.org"),
        ("=?utf-8?q?J=C3=B6rg?= <joerg@x.org>", "joerg@x.org"),
        ("<alice@[1.2.3.4]>", "alice@[1.2.3.4]"),
        ("", None),
        ("alice", None),
        ("a@x.org, b@x.org", None),
        ("<>", None),
        ("Alice <alice@x.org", None),
        ('"a@b"@x.org', None),
        ("Jörg <jörg@bücher.de>", "jörg@bücher.de"),
        ("Undisclosed: a@x.org;", "a@x.org"),
    ],
)
def test_from_address(value, expected):
    mail = parse_mail(f"From: {value}\r\nSubject: x\r\n\r\nbody".encode())
    assert from_address(mail) == expected


def test_utf8_check():
    assert is_utf8(b"plain ascii")
    assert is_utf8("Grüße 🙂".encode() * 1_000_000)
    assert not is_utf8(b"caf\xe9")
    assert not is_utf8(b"x" * (1 << 20) + b"\xc3")  # cut in the last chunk


def test_header_section_limit():
    with pytest.raises(MalformedMessage):
        parse_mail(b"X: " + b"y" * (2 << 20) + b"\r\n\r\nbody")
    assert from_address(parse_mail(b"From: a@b.org")) == "a@b.org"  # no body at all


# Arbitrary MIME-ish input: structure that reaches deep into the parsers, plus noise.
_tokens = st.sampled_from(
    [
        "From: a@b.org",
        "From: <>",
        "From: x",
        "Subject: Autocrypt Setup Message",
        "Secure-Join: vc-request",
        "Auto-Submitted: yes",
        'Content-Type: multipart/encrypted; boundary="b"',
        "Content-Type: multipart/mixed; boundary=b",
        "Content-Type: multipart/report; boundary=",
        "Content-Type: application/pgp-encrypted",
        "Content-Type: application/octet-stream",
        "Content-Type: text/plain",
        'Content-Type: ;;;="',
        "Version: 1",
        "--b",
        "--b--",
        "--",
        "",
        " folded",
        "-----BEGIN PGP MESSAGE-----",
        "-----END PGP MESSAGE-----",
        "Version: evil",
        "wcBMA0tLS0tLS0tL",
        "=njUN",
        "0xAA==",
        "Secure-Join: vc-request\r\n",
        "\x00",
        "é",
        "DKIM-Signature: v=1; d=b.org; s=s",
    ]
)
mime_like = st.lists(st.one_of(_tokens, st.text(max_size=20)), max_size=40).map(
    lambda lines: "\r\n".join(lines).encode("utf-8", "surrogatepass")
)
any_message = st.one_of(mime_like, st.binary(max_size=500))


@given(any_message, st.booleans())
@settings(max_examples=400, deadline=None)
def test_classifiers_never_raise(data, outgoing):
    try:
        mail = parse_mail(data)
    except MalformedMessage:
        return
    sender = from_address(mail) or "a@b.org"
    for result in (
        is_encrypted(mail, outgoing),
        is_securejoin(mail),
        is_autocrypt_setup_message(mail, sender, [sender]),
        is_mailer_daemon_report(mail, sender),
    ):
        assert result in (True, False)


@pytest.fixture(scope="module")
def running_filters(tmp_path_factory):
    loop_thread = LoopThread()
    sink = Sink(loop_thread)
    tmp = tmp_path_factory.mktemp("filtermail")
    config = parse_params(
        {
            "mail_domain": "chat.example.org",
            "mailboxes_dir": str(tmp / "mailboxes"),
            "counters_dir": str(tmp / "counters"),
            "postfix_reinject_port": str(sink.port),
            "postfix_reinject_port_incoming": str(sink.port),
            "max_user_send_per_minute": "1000000",
            "max_user_send_burst_size": "1000000",
        }
    ).config
    filters = {
        mode: Filtermail(loop_thread, config, mode, skip_dkim=True)
        for mode in ("outgoing", "incoming")
    }
    yield filters
    for fm in filters.values():
        fm.stop()
    sink.stop()
    loop_thread.stop()


@given(any_message, st.sampled_from(["outgoing", "incoming"]))
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_smtp_reply_for_any_message(running_filters, data, mode):
    """Whatever the message, the filter answers 2xx or 5xx and keeps serving."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    with smtplib.SMTP("127.0.0.1", running_filters[mode].port, timeout=30) as client:
        client.ehlo("x")
        assert client.mail("a@b.org")[0] == 250
        assert client.rcpt("c@chat.example.org")[0] == 250
        code, text = client.data(data)
        assert code // 100 in (2, 5), (code, text)


def read_data_sync(stream: bytes, limit: int, buffer_limit: int):
    """Run filtermail's DATA reader on ``stream``; return (data, bytes left unread)."""
    from chatmaild.filtermail import read_data

    async def run():
        reader = asyncio.StreamReader(limit=buffer_limit)
        reader.feed_data(stream)
        reader.feed_eof()
        data = await read_data(reader, limit)
        return data, await reader.read()

    return asyncio.run(run())


@pytest.mark.parametrize(
    "stream,data,rest",
    [
        (b".\r\nQUIT\r\n", b"", b"QUIT\r\n"),
        (b"\r\n.\r\nQUIT\r\n", b"\r\n", b"QUIT\r\n"),
        (b"a\r\n.\r\nQUIT\r\n", b"a\r\n", b"QUIT\r\n"),
        (b"End.\r\nx\r\n.\r\nQUIT\r\n", b"End.\r\nx\r\n", b"QUIT\r\n"),
        (b"..\r\n...x\r\n.\r\n", b".\r\n..x\r\n", b""),
        (b"a\n.\r\nb\r\n.\r\n.\r\n", b"a\n.\r\nb\r\n", b".\r\n"),  # bare LF: no line start
        (b"x" * 100 + b"\r\n.\r\nQUIT\r\n", b"x" * 100 + b"\r\n", b"QUIT\r\n"),
    ],
    ids=["empty", "empty-line", "one-line", "line-ending-in-dot", "dot-stuffed", "bare-lf", "long"],
)
@pytest.mark.parametrize("buffer_limit", [4, 5, 7, 64, 1 << 16])
def test_read_data(stream, data, rest, buffer_limit):
    assert read_data_sync(stream, 1000, buffer_limit) == (data, rest)


def test_read_data_size_limit_reads_to_the_end():
    stream = b"x" * 5000 + b"\r\n.\r\nQUIT\r\n"
    assert read_data_sync(stream, 4000, 64) == (None, b"QUIT\r\n")
    assert read_data_sync(stream, 5002, 64)[0] == b"x" * 5000 + b"\r\n"


@given(
    st.lists(st.text(alphabet=".\rab-", max_size=8).map(str.encode), max_size=20),
    st.integers(4, 40),
)
@settings(deadline=None)
def test_read_data_roundtrip(lines, buffer_limit):
    from chatmaild.smtpclient import dot_stuff

    content = b"".join(line + b"\r\n" for line in lines)
    stuffed = dot_stuff(content) if content else b""
    assert read_data_sync(stuffed + b".\r\nNEXT", 10_000, buffer_limit) == (content, b"NEXT")


@given(st.from_regex(_SIMPLE_FROM, fullmatch=True))
@settings(deadline=None)
def test_from_fast_path_agrees_with_full_parser(value):
    """The regex shortcut for common From values gives the full parser's answer."""
    header = default_policy.header_factory("From", value)
    assert not header.defects
    assert [a.addr_spec for a in header.addresses] == [single_address(value)]


def hostile_delimiter_flood(size: int) -> bytes:
    """A multipart/encrypted message whose body is nothing but delimiter lines."""
    header = (
        b"From: <bob@other.example>\r\nTo: <alice@chat.example.org>\r\nSubject: x\r\n"
        b"Content-Type: multipart/encrypted; boundary=b\r\n\r\n"
    )
    return header + b"--b\r\n" * (size // 5) + b"--b--\r\n"


def test_delimiter_flood_memory_is_bounded():
    """Millions of delimiter lines cost no memory per line (was ~38x the message)."""
    import tracemalloc

    data = hostile_delimiter_flood(6_000_000)
    tracemalloc.start()
    try:
        mail = parse_mail(data)
        assert not is_encrypted(mail, outgoing=False)
        assert not is_securejoin(mail)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(data) // 10, peak


def test_split_multipart_stops_after_max_parts():
    body = memoryview(b"--b\r\nA\r\n--b\r\nB\r\n--b\r\nC\r\n--b--\r\n")
    assert [bytes(p) for p in split_multipart(body, "b", max_parts=3)] == [b"A", b"B", b"C"]
    assert split_multipart(body, "b", max_parts=2) is None
