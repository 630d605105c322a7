"""The stdin/stdout of an OpenSMTPD filter (:mod:`chatmaild.smtpdfilter`): smtpd's lines
in, answers out, with bounded memory on both sides."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NamedTuple

log = logging.getLogger("smtpdfilter")

# A data line may be long (smtpd accepts up to 64 KiB); longer input is garbage.
MAX_LINE = 1 << 20
# Written but not yet taken by smtpd: above this, giving a message back waits.
OUTPUT_BUFFERED = 1 << 20
DRAIN_POLL_S = 0.002


class Output(NamedTuple):
    """Where answers to smtpd go: ``write`` a text, ``drain`` until it is mostly sent."""

    write: Callable[[str], None]
    drain: Callable[[], Awaitable[None]]
    close: Callable[[], None]


def _output(transport: asyncio.WriteTransport) -> Output:
    def write(text: str) -> None:
        transport.write(text.encode("utf-8", "surrogateescape"))

    async def drain() -> None:
        while transport.get_write_buffer_size() > OUTPUT_BUFFERED and not transport.is_closing():
            await asyncio.sleep(DRAIN_POLL_S)

    return Output(write, drain, transport.close)


async def open_stdio(stdin=None, stdout=None) -> tuple[asyncio.StreamReader, Output]:
    """Non-blocking line reader on stdin, and the output to stdout.

    smtpd gives a filter one socket as stdin and stdout (a socketpair): that is one
    bidirectional stream. asyncio's write-pipe transport must not be used on it: it
    watches its fd for readability to notice a closed peer, so the first request smtpd
    sends would make it close our output. Pipes (tests, ``sh -c`` plumbing) get the
    read and write pipe transports.
    """
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    loop = asyncio.get_running_loop()
    in_stat, out_stat = os.fstat(stdin.fileno()), os.fstat(stdout.fileno())
    if stat.S_ISSOCK(in_stat.st_mode) and os.path.samestat(in_stat, out_stat):
        sock = socket.socket(fileno=os.dup(stdin.fileno()))
        reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_LINE)
        # closing through the writer keeps it referenced: Python 3.13 closes the transport
        # of a StreamWriter that is garbage-collected
        return reader, _output(writer.transport)._replace(close=writer.close)
    reader = asyncio.StreamReader(limit=MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
    transport, _ = await loop.connect_write_pipe(asyncio.Protocol, stdout)
    return reader, _output(transport)


async def read_lines(reader: asyncio.StreamReader) -> AsyncIterator[str]:
    """smtpd's non-empty lines until it closes our input; a line over MAX_LINE is
    skipped whole (and logged), so garbage cannot grow our memory."""
    while True:
        try:
            raw = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                log.warning("ignoring an unterminated last line")
            return
        except asyncio.LimitOverrunError as exc:
            log.warning("ignoring a line longer than %d bytes", MAX_LINE)
            await reader.read(exc.consumed)
            while True:  # the rest of that line
                try:
                    await reader.readuntil(b"\n")
                    break
                except asyncio.LimitOverrunError as more:
                    await reader.read(more.consumed)
            continue
        line = raw[:-1].decode("utf-8", "surrogateescape").rstrip("\r")
        if line:
            yield line
