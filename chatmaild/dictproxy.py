"""Dovecot's dict protocol (``proxy:`` dict driver) over a UNIX stream socket.

Parsing is pure (:func:`parse_request`); :class:`DictProxy` is the thin I/O shell that
daemons subclass, implementing only the hooks they need. Transactions live per
connection because Dovecot reuses transaction ids across connections.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import socketserver
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Self

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
_TAB_UNESCAPES = {"0": "\0", "1": "\x01", "t": "\t", "r": "\r", "n": "\n"}


def _unescape_tab(value: str) -> str:
    """Undo Dovecot's tab-escaping (``str_tabunescape``: ``\\x01`` + one character).

    ``0 1 t r n`` stand for NUL, ``\\x01``, TAB, CR and LF; any other character stands for
    itself, and a trailing lone ``\\x01`` is dropped, as in Dovecot.
    """
    if "\x01" not in value:
        return value
    out, chars = [], iter(value)
    for ch in chars:
        if ch == "\x01":
            escaped = next(chars, "")
            out.append(_TAB_UNESCAPES.get(escaped, escaped))
        else:
            out.append(ch)
    return "".join(out)


def _escape_tab(value: str) -> str:
    """Dovecot's ``str_append_tabescaped_n``: no TAB, CR or LF is left in a field."""
    return (
        value.replace("\x01", "\x011")
        .replace("\0", "\x010")
        .replace("\t", "\x01t")
        .replace("\r", "\x01r")
        .replace("\n", "\x01n")
    )


@dataclass(frozen=True)
class Hello:
    args: tuple[str, ...]


@dataclass(frozen=True)
class Lookup:
    key: str
    user: str


@dataclass(frozen=True)
class Iterate:
    flags: int
    max_rows: int
    prefix: str
    user: str


@dataclass(frozen=True)
class Begin:
    tid: str
    user: str


@dataclass(frozen=True)
class Set:
    tid: str
    key: str
    value: str


@dataclass(frozen=True)
class Unset:
    tid: str
    key: str


@dataclass(frozen=True)
class Commit:
    tid: str
    # ``D`` (commit async, sent by Dovecot before 2.3) wants its reply prefixed with ``A``.
    async_reply: bool = False


@dataclass(frozen=True)
class Rollback:
    tid: str


@dataclass(frozen=True)
class Ignored:
    """A request we acknowledge by silence (timestamps, atomic increments, ...)."""

    command: str


class ProtocolError(ValueError):
    """A line that is not a dict-protocol request."""


class LookupFailed(Exception):
    """A lookup that must fail (reply ``F``: Dovecot's temporary failure), already logged."""


Request = Hello | Lookup | Iterate | Begin | Set | Unset | Commit | Rollback | Ignored


def parse_request(line: str) -> Request:
    """Parse one request line (without the newline)."""
    if not line:
        raise ProtocolError("empty request")
    cmd, rest = line[0], line[1:]
    parts = [_unescape_tab(p) for p in rest.split("\t")]
    try:
        if cmd == "H":
            return Hello(tuple(parts))
        if cmd == "L":
            return Lookup(parts[0], parts[1] if len(parts) > 1 else "")
        if cmd == "I":
            return Iterate(
                int(parts[0] or 0),
                int(parts[1] or 0),
                parts[2],
                parts[3] if len(parts) > 3 else "",
            )
        if cmd == "B":
            return Begin(parts[0], parts[1] if len(parts) > 1 else "")
        if cmd == "S":
            return Set(parts[0], parts[1], parts[2])
        if cmd == "U":
            return Unset(parts[0], parts[1])
        if cmd in ("C", "D"):
            return Commit(parts[0], async_reply=cmd == "D")
        if cmd == "R":
            return Rollback(parts[0])
        if cmd in ("A", "T", "E"):
            return Ignored(cmd)
    except (IndexError, ValueError) as exc:
        raise ProtocolError(f"malformed {cmd!r} request: {exc}") from None
    raise ProtocolError(f"unknown command {cmd!r}")


@dataclass
class Transaction:
    user: str
    ok: bool = True


@dataclass
class ConnectionState:
    transactions: dict[str, Transaction] = field(default_factory=dict)


class DictProxy:
    """Base dict server: override :meth:`lookup`, :meth:`iterate` and/or :meth:`set`."""

    def lookup(self, key: str, user: str) -> str | None:
        """Value for ``key`` (reply ``O``), None for not found (``N``); raise for ``F``."""
        return None

    def iterate(self, prefix: str, user: str) -> Iterable[tuple[str, str]]:
        return ()

    def set(self, user: str, key: str, value: str) -> bool:
        """Apply one write of a transaction; False fails the commit."""
        return False

    def unset(self, user: str, key: str) -> bool:
        return True

    def loggable_key(self, key: str) -> str:
        """``key`` as log lines may show it; override for keys that carry secrets."""
        return key

    # -- protocol ---------------------------------------------------------------------

    def reply(self, request: Request, state: ConnectionState) -> str | None:
        """The reply line(s) for one request, or None when the protocol wants silence."""
        if isinstance(request, Lookup):
            try:
                value = self.lookup(request.key, request.user)
            except LookupFailed as exc:
                return f"F{_escape_tab(str(exc))}\n"
            except Exception as exc:  # every failure becomes an F reply
                log.exception("lookup of %r failed", self.loggable_key(request.key))
                return f"F{_escape_tab(str(exc))}\n"
            return "N\n" if value is None else f"O{_escape_tab(value)}\n"
        if isinstance(request, Iterate):
            rows = []
            try:
                for key, value in self.iterate(request.prefix, request.user):
                    rows.append(f"O{_escape_tab(key)}\t{_escape_tab(value)}\n")
                    if request.max_rows and len(rows) >= request.max_rows:
                        break
            except Exception as exc:
                log.exception("iteration of %r failed", request.prefix)
                return f"F{_escape_tab(str(exc))}\n"
            return "".join(rows) + "\n"
        if isinstance(request, Begin):
            state.transactions[request.tid] = Transaction(user=request.user)
            return None
        if isinstance(request, (Set, Unset)):
            trans = state.transactions.get(request.tid)
            if trans is None:
                log.warning("write to unknown transaction %r", request.tid)
                return None
            try:
                if isinstance(request, Set):
                    done = self.set(trans.user, request.key, request.value)
                else:
                    done = self.unset(trans.user, request.key)
            except Exception:
                log.exception("write of %r failed", self.loggable_key(request.key))
                done = False
            if not done:
                log.error("dict write failed for key %r", self.loggable_key(request.key))
                trans.ok = False
            return None
        if isinstance(request, Commit):
            trans = state.transactions.pop(request.tid, None)
            ok = trans is not None and trans.ok
            prefix = "A" if request.async_reply else ""
            return f"{prefix}{'O' if ok else 'F'}{request.tid}\n"
        if isinstance(request, Rollback):
            state.transactions.pop(request.tid, None)
            return None
        return None  # Hello, Ignored

    def handle_connection(self, rfile: BinaryIO, wfile: BinaryIO) -> None:
        """Serve one client until it disconnects; garbage lines are logged and skipped."""
        state = ConnectionState()
        while True:
            raw = rfile.readline(MAX_LINE + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
                log.warning("dict request longer than %d bytes dropped", MAX_LINE)
                while raw and not raw.endswith(b"\n"):
                    raw = rfile.readline(MAX_LINE + 1)
                continue
            line = raw.rstrip(b"\r\n").decode("utf-8", errors="replace")
            if not line:
                continue
            try:
                request = parse_request(line)
            except ProtocolError as exc:
                log.warning("unknown dictproxy request: %s", exc)
                # A write we cannot parse must fail its transaction, not vanish from it.
                if line[0] in "SUA":
                    trans = state.transactions.get(line[1:].split("\t", 1)[0])
                    if trans is not None:
                        trans.ok = False
                continue
            answer = self.reply(request, state)
            if answer is not None:
                wfile.write(answer.encode("utf-8"))
                wfile.flush()

    def make_server(self, socket_path: str | Path) -> socketserver.ThreadingUnixStreamServer:
        """Bind the UNIX socket (replacing a stale one); the caller runs ``serve_forever``.

        Tests and benchmarks use this to run a proxy in a thread and ``shutdown()`` it.
        """
        proxy = self
        socket_path = Path(socket_path)

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    proxy.handle_connection(self.rfile, self.wfile)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True
            request_queue_size = 1000

        socket_path.unlink(missing_ok=True)
        server = Server(str(socket_path), Handler)
        os.chmod(socket_path, 0o660)
        return server

    def serve_forever(self, socket_path: str | Path) -> None:
        """Listen on a UNIX socket, one thread per connection, until SIGTERM.

        SIGTERM (systemd's stop) becomes SystemExit, so the caller's ``finally`` blocks
        run, e.g. the last second of counts gets written. Call from the main thread.
        """
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with self.make_server(socket_path) as server:
            log.info("listening on %s", socket_path)
            server.serve_forever()


class DictError(RuntimeError):
    """The server answered ``F`` (failure)."""


class DictClient:
    """Minimal synchronous dict-protocol client, the way Dovecot's ``proxy:`` driver talks.

    For tests, benchmarks and health checks; one instance per connection, not thread-safe.
    """

    def __init__(self, socket_path: str | Path, timeout: float = 10.0, dict_name: str = ""):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(socket_path))
        self.rfile = self.sock.makefile("rb")
        self._tids = itertools.count(1)
        # major 3, minor 2, value type 0 (string), no user, the dict's name
        self.send(f"H3\t2\t0\t\t{_escape_tab(dict_name)}")

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode("utf-8") + b"\n")

    def read_line(self) -> str:
        raw = self.rfile.readline(MAX_LINE + 1)
        if not raw:
            raise ConnectionError("dict server closed the connection")
        return raw.rstrip(b"\n").decode("utf-8")

    def lookup(self, key: str, user: str = "") -> str | None:
        self.send(f"L{_escape_tab(key)}\t{_escape_tab(user)}")
        reply = self.read_line()
        if reply.startswith("O"):
            return _unescape_tab(reply[1:])
        if reply.startswith("N"):
            return None
        raise DictError(f"lookup of {key!r} failed: {reply!r}")

    def iterate(self, prefix: str, user: str = "") -> list[tuple[str, str]]:
        self.send(f"I0\t0\t{_escape_tab(prefix)}\t{_escape_tab(user)}")
        rows = []
        while reply := self.read_line():
            if not reply.startswith("O"):
                raise DictError(f"iteration of {prefix!r} failed: {reply!r}")
            key, _, value = reply[1:].partition("\t")
            rows.append((_unescape_tab(key), _unescape_tab(value)))
        return rows

    def set_values(self, values: dict[str, str], user: str = "") -> bool:
        """Write ``values`` in one transaction; True if the server committed it."""
        tid = next(self._tids)
        lines = [f"B{tid}\t{_escape_tab(user)}"]
        lines += [f"S{tid}\t{_escape_tab(k)}\t{_escape_tab(v)}" for k, v in values.items()]
        lines.append(f"C{tid}")
        self.sock.sendall("".join(line + "\n" for line in lines).encode("utf-8"))
        return self.read_line().startswith("O")

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
