"""smtpd-filters(7), protocol 0.7, as pure functions: the lines smtpd sends a filter,
the filter's answers, and the message data lines between them.

:mod:`chatmaild.smtpdfilter` is the state machine and I/O around these.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from typing import NamedTuple

from .smtpdproto import ConfigEntry, parse_config_line

SUBSYSTEM = "smtp-in"
REPORTS = ("link-auth", "link-disconnect", "tx-begin", "tx-mail", "tx-rcpt", "tx-reset")
# outgoing also learns each session's client address, for failed-login throttling
OUTGOING_REPORTS = ("link-connect", *REPORTS)
FILTERS = {
    "incoming": ("rcpt-to", "data-line", "commit"),
    "outgoing": ("connect", "auth", "mail-from", "rcpt-to", "data-line", "commit"),
}
# Data lines given back to smtpd are built in chunks of about this many bytes.
OUTPUT_CHUNK = 1 << 16
_FIELD_NAME = re.compile(r"^([!-9;-~]+)[ \t]*:")


class FilterProtocolError(ValueError):
    """A line from smtpd that is not an event we can read."""


# NamedTuples, not dataclasses: one is built for every line of every message.
class Report(NamedTuple):
    """``report|<version>|<time>|<subsystem>|<event>|<session>[|<params>]``."""

    version: str
    subsystem: str
    event: str
    session: str
    params: str


class FilterRequest(NamedTuple):
    """``filter|<version>|<time>|<subsystem>|<phase>|<session>|<token>[|<params>]``."""

    version: str
    subsystem: str
    phase: str
    session: str
    token: str
    params: str


def parse_line(line: str) -> ConfigEntry | Report | FilterRequest:
    """One line from smtpd (without its newline). Only the last field may hold ``|``."""
    # data lines first: they are nearly all the traffic
    if line.startswith("filter|"):
        fields = line.split("|", 7)
        if len(fields) < 7 or not fields[5] or not fields[6]:
            raise FilterProtocolError(f"filter request with too few fields: {line[:80]!r}")
        params = fields[7] if len(fields) == 8 else ""
        return FilterRequest(fields[1], fields[3], fields[4], fields[5], fields[6], params)
    if line.startswith("report|"):
        fields = line.split("|", 6)
        if len(fields) < 6 or not fields[5]:
            raise FilterProtocolError(f"report with too few fields: {line[:80]!r}")
        params = fields[6] if len(fields) == 7 else ""
        return Report(fields[1], fields[3], fields[4], fields[5], params)
    if line.startswith("config|"):
        entry = parse_config_line(line)
        if entry is None:
            raise FilterProtocolError(f"malformed config line {line[:80]!r}")
        return entry
    raise FilterProtocolError(f"unknown line type {line.split('|', 1)[0][:40]!r}")


def registrations(mode: str) -> list[str]:
    """The handshake answer to ``config|ready`` for one direction."""
    reports = OUTGOING_REPORTS if mode == "outgoing" else REPORTS
    lines = [f"register|report|{SUBSYSTEM}|{event}" for event in reports]
    lines += [f"register|filter|{SUBSYSTEM}|{phase}" for phase in FILTERS[mode]]
    return [*lines, "register|ready"]


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


def format_result(session: str, token: str, reply: str | None, disconnect: bool = False) -> str:
    """``filter-result``: proceed for None, else reject (or disconnect) with the reply."""
    if reply is None:
        decision = "proceed"
    else:
        decision = f"{'disconnect' if disconnect else 'reject'}|{_one_line(reply)}"
    return f"filter-result|{session}|{token}|{decision}\n"


def format_dataline(session: str, token: str, line: str) -> str:
    return f"filter-dataline|{session}|{token}|{line}\n"


def split_report_params(event: str, params: str) -> list[str]:
    """Event parameters; the last one (an address or user name) may contain ``|``."""
    counts = {"link-auth": 2, "link-connect": 4, "tx-mail": 3, "tx-rcpt": 3}
    return params.split("|", counts.get(event, 1) - 1)


def plain_credentials(auth_param: str) -> tuple[str, str] | None:
    """(user, password) from the ``auth`` phase's ``PLAIN <initial response>``, else None.

    RFC 4616: base64 of ``authzid NUL authcid NUL passwd``. ``LOGIN`` and ``PLAIN``
    without an initial response never show the password to a filter.
    """
    mechanism, _, response = auth_param.strip().partition(" ")
    if mechanism.upper() != "PLAIN" or not response or response == "=":
        return None
    try:
        decoded = base64.b64decode(response.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    parts = decoded.split("\0")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def unstuff(line: str) -> str:
    """A data line as the message holds it (RFC 5321 §4.5.2)."""
    return line.removeprefix(".")


def stuff(line: str) -> str:
    return "." + line if line.startswith(".") else line


def clean_header_lines(
    lines: Iterable[str], drop: frozenset[str], replace: dict[str, str]
) -> Iterable[str]:
    """The message's lines with header fields (and their continuations) dropped/replaced.

    Only the top-level header section (up to the first empty line) is touched.
    """
    in_header = True
    skipping = False
    for line in lines:
        if in_header:
            if not line:
                in_header = False
            elif line[:1] in (" ", "\t"):
                if skipping:
                    continue
            else:
                skipping = False
                match = _FIELD_NAME.match(line)
                name = match.group(1).lower() if match else ""
                if name in drop:
                    skipping = True
                    continue
                if name in replace:
                    skipping = True
                    yield replace[name]
                    continue
        yield line


def message_dataline_chunks(prefix: bytes, data: bytes | bytearray, start: int) -> Iterable[bytes]:
    """``data[start:]`` (whole CRLF lines) as ``prefix + dot-stuffed line + LF`` lines, in
    chunks of about :data:`OUTPUT_CHUNK` bytes built with bytes operations, not per line."""
    view = memoryview(data)
    pos = start
    while pos < len(data):
        cut = data.find(b"\r\n", min(pos + OUTPUT_CHUNK, len(data) - 2))
        end = len(data) if cut < 0 else cut + 2
        block = b"\r\n" + bytes(view[pos : end - 2])
        block = block.replace(b"\r\n.", b"\r\n..").replace(b"\r\n", b"\n" + prefix)
        yield block[1:] + b"\n"
        pos = end
