"""What kind of mail is this? Pure functions over the raw message bytes.

The message is never copied as a whole and never fully MIME-parsed: the header section is
parsed with the stdlib parser (``compat32``, tolerant of malformed input), and the body of
a ``multipart/encrypted`` message is split at its boundary lines with a regex over the raw
bytes. Parts are memoryview slices of the message; only the armored payload is decoded.
Every function here returns a value for any input and never raises.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from email.errors import NonASCIILocalPartDefect
from email.message import Message
from email.parser import HeaderParser
from email.policy import compat32
from email.policy import default as _default_policy

from .openpgp import dearmor_message, is_encrypted_payload

# The header section ends at the first empty line (CRLF CRLF; bare LF tolerated).
_HEADER_END = re.compile(rb"\r?\n\r?\n")
MAX_HEADER_BYTES = 1 << 20
_UTF8_CHUNK = 1 << 20

AUTOCRYPT_SETUP_SUBJECT = "Autocrypt Setup Message"
# Parts a multipart body may have before classifiers give up on it: more than any
# message they accept (encrypted: 2, Secure-Join: 1, delivery report: 3) has.
MAX_PARTS = 16
DELIVERY_STATUS_TYPES = frozenset({"delivery-status", "global-delivery-status"})
SECUREJOIN_REQUESTS = frozenset({"vc-request", "vg-request"})
_FOLDING = re.compile(r"\r?\n(?=[ \t])")
_address_header = _default_policy.header_factory
# The common shapes ``a@b.org``, ``<a@b.org>``, ``Name <a@b.org>``, ``"Name" <a@b.org>``
# (Name may be RFC 2047 encoded) with an ASCII dot-atom address, read without the full
# RFC 5322 parser, which costs ~60 us per message. Anything else goes to the full parser,
# which reads these shapes to the same address.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_SIMPLE_ADDR = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9.]+\])"
_SIMPLE_FROM = re.compile(
    rf'(?:({_SIMPLE_ADDR})|(?:(?:{_ATEXT}|[ ])*|"[ !#-\[\]-~]*") ?<({_SIMPLE_ADDR})>)'
)


class MalformedMessage(ValueError):
    """The bytes cannot be read as a message at all."""


@dataclass(frozen=True)
class Mail:
    headers: Message  # header section only, values as str
    body: memoryview  # the raw body, a view into the original bytes

    def get(self, name: str) -> str:
        value = self.headers.get(name)
        return str(value).strip() if value is not None else ""

    @property
    def content_type(self) -> str:
        return self.headers.get_content_type()


def is_utf8(data: bytes | bytearray) -> bool:
    """Valid UTF-8, checked in chunks so a large message is never decoded as a whole."""
    if data.isascii():
        return True
    view = memoryview(data)
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        for start in range(0, len(view), _UTF8_CHUNK):
            decoder.decode(view[start : start + _UTF8_CHUNK])
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def split_header(data: bytes | memoryview) -> tuple[str, memoryview]:
    """The header section as text and the body as a view; MalformedMessage if unusable.

    The caller has checked that ``data`` is UTF-8.
    """
    view = memoryview(data)
    match = _HEADER_END.search(view, 0, MAX_HEADER_BYTES + 4)
    if match:
        header_bytes, body = view[: match.start()], view[match.end() :]
    elif len(view) <= MAX_HEADER_BYTES:
        header_bytes, body = view, view[len(view) :]  # headers only, empty body
    else:
        raise MalformedMessage("header section too large")
    try:
        return str(header_bytes, "utf-8"), body
    except UnicodeDecodeError:
        raise MalformedMessage("header section is not UTF-8") from None


def parse_mail(data: bytes | memoryview) -> Mail:
    header_text, body = split_header(data)
    headers = HeaderParser(policy=compat32).parsestr(header_text + "\n\n", headersonly=True)
    return Mail(headers, body)


def parse_part(part: memoryview) -> Mail:
    """A MIME body part: its headers (maybe none) and its content."""
    if bytes(part[:2]) == b"\r\n" or bytes(part[:1]) == b"\n":
        headers = HeaderParser(policy=compat32).parsestr("\n", headersonly=True)
        return Mail(headers, part[2 if part[0] == 13 else 1 :])
    return parse_mail(part)


def single_address(value: str) -> str | None:
    """The one ``local@domain`` address in a header value, or None.

    Parsed with the stdlib's RFC 5322 address parser (it knows domain literals like
    ``user@[1.2.3.4]``, which IPv4-only relays use); any parse defect means None, except
    a non-ASCII local part, which SMTPUTF8 (RFC 6531) allows.
    """
    value = _FOLDING.sub("", value).strip()
    if not value:
        return None
    simple = _SIMPLE_FROM.fullmatch(value)
    if simple:
        return simple.group(1) or simple.group(2)
    try:
        header = _address_header("From", value)
        addresses = header.addresses
    except Exception:  # noqa: BLE001 - the parser documents no exception set; any is "invalid"
        return None
    defects = [d for d in header.defects if not isinstance(d, NonASCIILocalPartDefect)]
    if defects or len(addresses) != 1:
        return None
    address = addresses[0]
    addr = address.addr_spec
    if not address.username or not address.domain or addr.count("@") != 1:
        return None
    if any(c.isspace() or ord(c) < 32 for c in addr):
        return None
    return addr


def from_address(mail: Mail) -> str | None:
    """The single address in the single ``From:`` header, or None."""
    values = mail.headers.get_all("From") or []
    if len(values) != 1:
        return None
    return single_address(str(values[0]))


def _scan_multipart(
    body: memoryview, boundary: str, max_parts: int
) -> tuple[list[memoryview], int, int] | None:
    """The parts, where the first delimiter line starts and where the closing one ends.

    None if there is no closing delimiter or more than ``max_parts`` parts: the scan stops
    there, so a body of nothing but delimiter lines costs no memory per line.
    """
    if not boundary or len(boundary) > 200:
        return None
    delimiter = re.compile(
        rb"--" + re.escape(boundary.encode("utf-8", "replace")) + rb"(--)?[ \t]*(?:\r?\n|\Z)"
    )
    parts: list[memoryview] = []
    first = start = None
    for match in delimiter.finditer(body):
        line_start = match.start()
        if line_start > 0 and body[line_start - 1] != 0x0A:
            continue
        if start is not None:
            # The line break before the delimiter belongs to the delimiter.
            end = line_start - 1 if line_start > start else line_start
            if end > start and body[end - 1] == 0x0D:
                end -= 1
            parts.append(body[start : max(start, end)])
        else:
            first = line_start
        if match.group(1):
            return (parts, first, match.end()) if start is not None else None
        if len(parts) == max_parts:
            return None
        start = match.end()
    return None


def split_multipart(
    body: memoryview, boundary: str, max_parts: int = MAX_PARTS
) -> list[memoryview] | None:
    """The body parts between ``--boundary`` delimiter lines (RFC 2046 §5.1.1).

    Preamble and epilogue are dropped; None if there is no closing delimiter or more than
    ``max_parts`` parts (callers know how many they can accept). The regex starts with
    the literal delimiter so the search over a large body is a fast scan; matches not at
    the start of a line are skipped.
    """
    scanned = _scan_multipart(body, boundary, max_parts)
    return scanned[0] if scanned is not None else None


def multipart_frame(body: memoryview, boundary: str) -> tuple[int, int] | None:
    """(start, end) of the body from its first delimiter line to the end of its closing
    one: what remains without preamble and epilogue. None if it is no multipart body."""
    scanned = _scan_multipart(body, boundary, MAX_PARTS)
    return scanned[1:] if scanned is not None else None


def _has_single_content_type(mail: Mail) -> bool:
    return len(mail.headers.get_all("Content-Type") or []) <= 1


def is_encrypted(mail: Mail, outgoing: bool) -> bool:
    """OpenPGP/MIME (RFC 3156): version part + armored message that is only ciphertext."""
    if mail.content_type != "multipart/encrypted" or not _has_single_content_type(mail):
        return False
    parts = split_multipart(mail.body, mail.headers.get_boundary() or "", max_parts=2)
    if parts is None or len(parts) != 2:
        return False
    try:
        version, payload = (parse_part(part) for part in parts)
    except MalformedMessage:
        return False
    if not (_has_single_content_type(version) and _has_single_content_type(payload)):
        return False
    if version.content_type != "application/pgp-encrypted":
        return False
    if bytes(version.body).strip() != b"Version: 1":
        return False
    if payload.content_type != "application/octet-stream":
        return False
    data = dearmor_message(payload.body, allow_version_header=not outgoing)
    return data is not None and is_encrypted_payload(data)


def is_securejoin(mail: Mail) -> bool:
    """A Secure-Join ``vc-request``/``vg-request``: the only cleartext Delta Chat handshake.

    It must be a multipart message with exactly one ``text/plain`` part whose text is
    nothing but ``Secure-Join: vc-request`` (or ``vg-request``).
    """
    if mail.get("Secure-Join").lower() not in SECUREJOIN_REQUESTS:
        return False
    if not mail.content_type.startswith("multipart/") or not _has_single_content_type(mail):
        return False
    parts = split_multipart(mail.body, mail.headers.get_boundary() or "", max_parts=1)
    if parts is None or len(parts) != 1 or len(parts[0]) > 4096:
        return False
    try:
        part = parse_part(parts[0])
    except MalformedMessage:
        return False
    if part.content_type != "text/plain" or not _has_single_content_type(part):
        return False
    text = bytes(part.body).decode("utf-8", "replace").strip().lower()
    return text in {f"secure-join: {request}" for request in SECUREJOIN_REQUESTS}


def is_autocrypt_setup_message(mail: Mail, from_addr: str, rcpt_tos: list[str]) -> bool:
    """A key backup a user sends to themselves (encrypted with a setup code, not OpenPGP/MIME)."""
    return (
        len(rcpt_tos) == 1
        and rcpt_tos[0].lower() == from_addr.lower()
        and mail.get("Subject") == AUTOCRYPT_SETUP_SUBJECT
        and mail.content_type == "multipart/mixed"
    )


def is_mailer_daemon_report(mail: Mail, from_addr: str) -> bool:
    """A delivery status notification (bounce) from a mail server, strictly checked.

    Bounces are the one cleartext mail every account accepts, so only their exact shape
    passes: ``From: mailer-daemon@...``, ``Auto-Submitted: auto-replied`` or
    ``auto-generated`` (RFC 3834 §5), ``multipart/report; report-type=delivery-status``
    (RFC 6522, RFC 3464; the ``global-`` forms of RFC 6533 too) with two or three parts,
    the second a ``message/delivery-status``. The caller still checks who sent it (DKIM).
    """
    auto_submitted = mail.get("Auto-Submitted").split(";", 1)[0].strip().lower()
    if auto_submitted not in ("auto-replied", "auto-generated"):
        return False
    if from_addr.rsplit("@", 1)[0].lower() != "mailer-daemon":
        return False
    if mail.content_type != "multipart/report" or not _has_single_content_type(mail):
        return False
    report_type = str(mail.headers.get_param("report-type", "") or "").lower()
    if report_type not in DELIVERY_STATUS_TYPES:
        return False
    parts = split_multipart(mail.body, mail.headers.get_boundary() or "", max_parts=3)
    if parts is None or len(parts) < 2:
        return False
    try:
        status = parse_part(parts[1])
    except MalformedMessage:
        return False
    return status.content_type == f"message/{report_type}"
