"""Is this an OpenPGP encrypted message? Structure checks only, no cryptography.

An encrypted message (RFC 9580 §10.3) is a sequence of session-key packets (PKESK, tag 1;
SKESK, tag 3) followed by exactly one Symmetrically Encrypted Integrity Protected Data
packet (SEIPD, tag 18) that ends exactly where the data ends. Anything else, such as a
literal-data packet (cleartext), compressed data, trailing bytes or a truncated packet, is
not encrypted. Both packet header formats are read: OpenPGP (new) format, including
partial body lengths, and the legacy (old) format GnuPG still uses for session-key packets.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass

TAG_PKESK = 1
TAG_SKESK = 3
TAG_SEIPD = 18
SESSION_KEY_TAGS = frozenset({TAG_PKESK, TAG_SKESK})
# One PKESK per recipient key (Postfix takes 1000 recipients), with room to spare.
MAX_SESSION_KEY_PACKETS = 10_000
# Partial body lengths are only allowed for data packets (RFC 9580 §4.2.1.4).
PARTIAL_LENGTH_TAGS = frozenset({8, 9, 11, 18, 20})

ARMOR_BEGIN = b"-----BEGIN PGP MESSAGE-----"
ARMOR_END = b"-----END PGP MESSAGE-----"
# Padding only at the very end: binascii would silently ignore data after it.
_BASE64_BODY = re.compile(rb"[A-Za-z0-9+/\r\n]*={0,2}[\r\n]*")
_CHECKSUM_LINE = re.compile(rb"\r?\n=[A-Za-z0-9+/]{4}[ \t]*\r?\n?\Z")
_ARMOR_HEADER = re.compile(rb"([!-9;-~]+): [^\r\n]*\r?\n")


class PacketError(ValueError):
    """The data is not a well-formed OpenPGP packet sequence."""


@dataclass(frozen=True)
class Packet:
    tag: int
    offset: int  # where the packet header starts
    end: int  # one past the packet's last body byte


def _read(data: bytes | memoryview, pos: int, count: int) -> int:
    """Big-endian unsigned integer of ``count`` bytes at ``pos``."""
    if pos + count > len(data):
        raise PacketError(f"truncated length field at offset {pos}")
    return int.from_bytes(data[pos : pos + count], "big")


def _new_format_body_end(data: bytes | memoryview, pos: int, tag: int) -> int:
    """Skip an OpenPGP-format body starting with its length octets at ``pos``."""
    while True:
        first = _read(data, pos, 1)
        if first < 192:
            return pos + 1 + first
        if first < 224:
            return pos + 2 + ((first - 192) << 8) + _read(data, pos + 1, 1) + 192
        if first == 255:
            return pos + 5 + _read(data, pos + 1, 4)
        # 224..254: a partial body chunk of 2**(first & 0x1f) bytes; another length follows.
        if tag not in PARTIAL_LENGTH_TAGS:
            raise PacketError(f"partial body length in a packet with tag {tag}")
        pos += 1 + (1 << (first & 0x1F))
        if pos > len(data):
            raise PacketError("truncated partial body chunk")


def _old_format_body_end(data: bytes | memoryview, pos: int, length_type: int) -> int:
    if length_type == 3:  # indeterminate: the packet runs to the end of the data
        return len(data)
    count = (1, 2, 4)[length_type]
    return pos + count + _read(data, pos, count)


def iter_packets(data: bytes | memoryview) -> Iterator[Packet]:
    """Yield the packets of ``data`` in order; raise PacketError on malformed framing."""
    pos = 0
    while pos < len(data):
        header = data[pos]
        if not header & 0x80:
            raise PacketError(f"byte {header:#04x} at offset {pos} is not a packet header")
        if header & 0x40:
            tag = header & 0x3F
            end = _new_format_body_end(data, pos + 1, tag)
        else:
            tag = (header >> 2) & 0x0F
            end = _old_format_body_end(data, pos + 1, header & 0x03)
        if tag == 0:
            raise PacketError(f"reserved packet tag 0 at offset {pos}")
        if end > len(data):
            raise PacketError(f"packet with tag {tag} at offset {pos} is truncated")
        yield Packet(tag, pos, end)
        pos = end


def is_encrypted_payload(data: bytes | memoryview) -> bool:
    """True for session-key packets followed by exactly one SEIPD packet, nothing else.

    Packets are looked at one by one, never collected, and at most
    :data:`MAX_SESSION_KEY_PACKETS` session keys are accepted: a message can hold
    millions of two-byte packets.
    """
    last_tag = None
    try:
        for count, packet in enumerate(iter_packets(data)):
            if last_tag is not None and last_tag not in SESSION_KEY_TAGS:
                return False  # only the last packet may be something else
            if count > MAX_SESSION_KEY_PACKETS:
                return False
            last_tag = packet.tag
    except PacketError:
        return False
    return last_tag == TAG_SEIPD


def dearmor_message(text: bytes | memoryview, allow_version_header: bool) -> bytes | None:
    """The binary data of an ASCII-armored ``PGP MESSAGE`` block, None if it is not one.

    The whole text must be the armor: begin line, optional armor headers, base64 lines,
    optional CRC24 line, end line, trailing line breaks. Armor headers are cleartext a
    sender controls, so only ``Version:`` is allowed, and only if ``allow_version_header``
    (incoming mail; our own users' clients never need it).
    """
    view = memoryview(text)
    if bytes(view[: len(ARMOR_BEGIN)]) != ARMOR_BEGIN:
        return None
    pos = len(ARMOR_BEGIN)
    if bytes(view[pos : pos + 2]) == b"\r\n":
        pos += 2
    elif bytes(view[pos : pos + 1]) == b"\n":
        pos += 1
    else:
        return None
    end = len(view)
    while end > pos and view[end - 1] in b"\r\n":
        end -= 1
    if end - pos < len(ARMOR_END) or bytes(view[end - len(ARMOR_END) : end]) != ARMOR_END:
        return None
    end -= len(ARMOR_END)
    if end > pos and view[end - 1] not in b"\n":
        return None  # the end line must start a line
    while match := _ARMOR_HEADER.match(view, pos, end):
        if not allow_version_header or match.group(1) != b"Version":
            return None
        pos = match.end()
    # The optional CRC24 line is the last one; look only at the tail (bodies can be MBs).
    tail_start = max(pos, end - 16)
    checksum = _CHECKSUM_LINE.search(bytes(view[tail_start:end]))
    if checksum:
        end = tail_start + checksum.start()
    body = view[pos:end]
    if not _BASE64_BODY.fullmatch(body):
        return None
    try:
        return binascii.a2b_base64(body)
    except binascii.Error:
        return None
