"""OpenPGP packet framing and ASCII armor: what counts as an encrypted message."""

from __future__ import annotations

import base64
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatmaild.openpgp import (
    MAX_SESSION_KEY_PACKETS,
    PacketError,
    dearmor_message,
    is_encrypted_payload,
    iter_packets,
)


def new_packet(tag: int, body: bytes) -> bytes:
    """OpenPGP-format packet with the shortest fixed length encoding."""
    n = len(body)
    if n < 192:
        length = bytes([n])
    elif n < 8384:
        length = bytes([192 + ((n - 192) >> 8), (n - 192) & 0xFF])
    else:
        length = b"\xff" + n.to_bytes(4, "big")
    return bytes([0xC0 | tag]) + length + body


def partial_packet(tag: int, body: bytes, chunk_exp: int = 9) -> bytes:
    """OpenPGP-format packet using partial body lengths of 2**chunk_exp bytes."""
    chunk = 1 << chunk_exp
    out = bytes([0xC0 | tag])
    while len(body) > chunk:
        out += bytes([224 + chunk_exp]) + body[:chunk]
        body = body[chunk:]
    tail = new_packet(tag, body)
    return out + tail[1:]


def old_packet(tag: int, body: bytes, length_type: int | None = None) -> bytes:
    """Legacy-format packet (tags 0..15 only), as GnuPG writes session-key packets."""
    n = len(body)
    if length_type is None:
        length_type = 0 if n < 256 else 1 if n < 65536 else 2
    if length_type == 3:
        return bytes([0x80 | tag << 2 | 3]) + body
    size = (1, 2, 4)[length_type]
    return bytes([0x80 | tag << 2 | length_type]) + n.to_bytes(size, "big") + body


PKESK = new_packet(1, b"\x03" + b"K" * 8 + b"\x01" + b"k" * 258)
SKESK = new_packet(3, b"\x04\x09\x03\x02" + b"s" * 8 + b"\x60" + b"e" * 40)
SEIPD = new_packet(18, b"\x01" + b"c" * 300)
SEIPD_V2 = new_packet(18, b"\x02\x09\x02\x10" + b"n" * 32 + b"c" * 300)
LITERAL = new_packet(11, b"b\x00\x00\x00\x00\x00Hello, cleartext!")
COMPRESSED = new_packet(8, b"\x01" + b"z" * 40)

PAYLOADS = [
    ("pkesk+seipd", PKESK + SEIPD, True),
    ("skesk+seipd", SKESK + SEIPD, True),
    ("two-pkesk+seipd", PKESK + PKESK + SEIPD, True),
    ("pkesk+skesk+seipdv2", PKESK + SKESK + SEIPD_V2, True),
    ("seipd-only", SEIPD, True),
    ("old-format-pkesk", old_packet(1, PKESK[3:]) + SEIPD, True),
    ("old-format-2-byte-length", old_packet(1, PKESK[3:], 1) + SEIPD, True),
    ("old-format-4-byte-length", old_packet(3, SKESK[2:], 2) + SEIPD, True),
    ("partial-seipd", PKESK + partial_packet(18, b"\x01" + b"c" * 3000), True),
    ("partial-seipd-exact-chunks", PKESK + partial_packet(18, b"\x01" + b"c" * 1023, 9), True),
    (
        "5-byte-length-seipd",
        PKESK + b"\xd2\xff" + (301).to_bytes(4, "big") + b"\x01" + b"c" * 300,
        True,
    ),
    ("empty", b"", False),
    ("pkesk-only", PKESK, False),
    ("seipd-then-pkesk", SEIPD + PKESK, False),
    ("two-seipd", PKESK + SEIPD + SEIPD, False),
    ("literal", LITERAL, False),
    ("pkesk+literal", PKESK + LITERAL, False),
    ("compressed", COMPRESSED, False),
    ("seipd+trailing-byte", PKESK + SEIPD + b"\x00", False),
    ("truncated-seipd-body", PKESK + SEIPD[:-1], False),
    ("truncated-length-field", PKESK + b"\xd2\xff\x00\x00", False),
    ("truncated-two-byte-length", PKESK + b"\xd2\xc5", False),
    ("truncated-partial-chunk", PKESK + b"\xd2\xe9" + b"c" * 100, False),
    ("partial-without-final-length", PKESK + b"\xd2\xe9" + b"c" * 512, False),
    ("partial-length-in-pkesk", b"\xc1\xe1\x03\x00" + SEIPD, False),
    ("old-format-indeterminate-pkesk", old_packet(1, PKESK[3:] + SEIPD, 3), False),
    ("no-packet-header-bit", b"\x41" + SEIPD, False),
    ("reserved-tag-0", b"\xc0\x01\x00" + SEIPD, False),
    ("garbage", b"HELLOWORLD", False),
    ("random-looking", bytes(range(256)), False),
]


@pytest.mark.parametrize("data,expected", [p[1:] for p in PAYLOADS], ids=[p[0] for p in PAYLOADS])
def test_is_encrypted_payload(data, expected):
    assert is_encrypted_payload(data) is expected


SEIPD = b"\xd2\x05\x01" + b"x" * 4


def test_many_session_key_packets_are_within_bounds():
    """One PKESK per recipient key is plenty; a flood of empty ones is not encrypted mail
    and is judged in bounded memory (a 30 MB message holds ~10 M two-byte packets)."""
    enough = b"\xc1\x00" * MAX_SESSION_KEY_PACKETS + SEIPD
    assert is_encrypted_payload(enough)
    flood = b"\xc1\x00" * 300_000 + SEIPD
    tracemalloc.start()
    try:
        assert not is_encrypted_payload(flood)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_iter_packets_reports_tags_and_offsets():
    packets = list(iter_packets(PKESK + partial_packet(18, b"\x01" + b"c" * 2000)))
    assert [p.tag for p in packets] == [1, 18]
    assert packets[0].offset == 0 and packets[0].end == len(PKESK) == packets[1].offset


def test_iter_packets_raises_on_truncation():
    with pytest.raises(PacketError, match="truncated"):
        list(iter_packets(SEIPD[:-5]))


@given(st.binary(max_size=2000))
def test_packet_parser_never_raises_unexpectedly(data):
    assert is_encrypted_payload(data) in (True, False)


def armored(
    data: bytes, headers: str = "", checksum: str | None = "=njUN", eol: str = "\r\n"
) -> bytes:
    b64 = base64.b64encode(data).decode()
    lines = [b64[i : i + 76] for i in range(0, len(b64), 76)]
    if checksum:
        lines.append(checksum)
    text = f"-----BEGIN PGP MESSAGE-----{eol}{headers}{eol}" + eol.join(lines)
    return (text + f"{eol}-----END PGP MESSAGE-----{eol}{eol}").encode()


MESSAGE = PKESK + SEIPD
ARMOR_CASES = [
    ("plain", armored(MESSAGE), True, MESSAGE),
    ("no-checksum", armored(MESSAGE, checksum=None), True, MESSAGE),
    ("lf-line-ends", armored(MESSAGE, eol="\n"), True, MESSAGE),
    ("version-header-incoming", armored(MESSAGE, "Version: X 1.0\r\n"), False, MESSAGE),
    ("version-header-outgoing", armored(MESSAGE, "Version: X 1.0\r\n"), True, None),
    ("comment-header-incoming", armored(MESSAGE, "Comment: buy watches\r\n"), False, None),
    ("no-begin-line", armored(MESSAGE)[27:], True, None),
    ("leading-space", b" " + armored(MESSAGE), True, None),
    ("no-end-line", armored(MESSAGE).replace(b"-----END PGP MESSAGE-----", b""), True, None),
    ("signature-block", armored(MESSAGE).replace(b"MESSAGE", b"SIGNATURE"), True, None),
    ("text-after-end", armored(MESSAGE) + b"P.S. cleartext\r\n", True, None),
    ("cleartext-inside", armored(MESSAGE).replace(b"\r\n=njUN", b"\r\nHello there!"), True, None),
    ("bad-padding", armored(MESSAGE).replace(b"\r\n=njUN", b"A\r\n=njUN"), True, None),
    ("empty", b"-----BEGIN PGP MESSAGE-----\r\n\r\n-----END PGP MESSAGE-----\r\n", True, b""),
]


@pytest.mark.parametrize(
    "text,outgoing,expected", [c[1:] for c in ARMOR_CASES], ids=[c[0] for c in ARMOR_CASES]
)
def test_dearmor_message(text, outgoing, expected):
    assert dearmor_message(text, allow_version_header=not outgoing) == expected


@given(st.binary(max_size=500), st.booleans())
def test_dearmor_never_raises(data, allow_version):
    text = b"-----BEGIN PGP MESSAGE-----\r\n" + data + b"\r\n-----END PGP MESSAGE-----"
    result = dearmor_message(text, allow_version)
    assert result is None or isinstance(result, bytes)
