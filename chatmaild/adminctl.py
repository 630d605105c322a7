"""``chatmail-adminctl``: the privileged half of the operator's tools, one request per
connection, for the unprivileged control API and the Salt module.

systemd hands the service its listening socket (socket activation, ``LISTEN_FDS``);
connections are served one after another, each with a deadline. Without a socket from
systemd one request is read from stdin and answered on stdout. A request is one JSON line of at most 64 KiB, ``{"op": ..., "args":
{...}}``; the reply one JSON line, ``{"ok": true, "result": ...}`` or ``{"ok": false,
"status": 404|422|503, "error": ...}``. Each socket serves one scope with a narrow set of
operations:

- ``accounts`` (as the mailbox owner): ``info``, ``block``, ``unblock``, ``delete``
  (:mod:`chatmaild.accountadmin`);
- ``queue`` (as root, which deleting from either MTA's queue needs): ``list``,
  ``flush``, ``delete`` (:mod:`chatmaild.mailqueue`).

Usage: ``chatmail-adminctl SCOPE INI [--mta postfix|opensmtpd]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from typing import BinaryIO

from . import accountadmin, mailqueue
from .blocklist import BlocklistError
from .config import DEFAULT_INI_PATH, EXIT_CONFIG, Config, config_for_main

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
#: A client gets this long to send its request and read the reply (queue commands
#: themselves time out after mailqueue.COMMAND_TIMEOUT_S).
CONNECTION_TIMEOUT_S = 60.0
SD_LISTEN_FDS_START = 3
SCOPES = ("accounts", "queue")


def _fail(status: int, error: str) -> dict:
    return {"ok": False, "status": status, "error": error}


def _accounts(config: Config, op: str, args: dict) -> object:
    addr = args.get("address")
    by = str(args.get("by") or "unknown")[:100]
    if op == "info":
        return accountadmin.account_info(config, addr).as_dict()
    if op == "block":
        entry, changed = accountadmin.block(config, addr, args.get("reason", ""), by)
        return {"blocked": entry, "changed": changed}
    if op == "unblock":
        return {"changed": accountadmin.unblock(config, addr)}
    if op == "delete":
        removed = accountadmin.delete_account(config, addr, args.get("reason", ""), by)
        return {"mailbox_removed": removed}
    raise KeyError(op)


def _queue(mta: str, op: str, args: dict) -> object:
    if op == "list":
        return [entry.as_dict() for entry in mailqueue.list_queue(mta)]
    if op == "flush":
        mailqueue.flush_queue(mta)
        return {"flushed": True}
    if op == "delete":
        return {"deleted": mailqueue.delete_message(mta, args.get("id"))}
    raise KeyError(op)


def handle(config: Config, scope: str, mta: str, raw: bytes) -> dict:
    """The reply to one request line; never raises."""
    try:
        request = json.loads(raw)
        op, args = request["op"], request.get("args") or {}
        if not isinstance(op, str) or not isinstance(args, dict):
            raise TypeError("op must be a string, args an object")
    except (ValueError, KeyError, TypeError) as exc:
        return _fail(422, f"bad request: {exc}")
    try:
        if scope == "accounts":
            result = _accounts(config, op, args)
        else:
            result = _queue(mta, op, args)
    except KeyError:
        return _fail(422, f"unknown {scope} operation {op!r}")
    except accountadmin.NoSuchAccount:
        return _fail(404, "no such account")
    except (accountadmin.AddressError, ValueError) as exc:
        return _fail(422, str(exc))
    except (BlocklistError, mailqueue.QueueError, OSError) as exc:
        log.error("%s %s failed: %s", scope, op, exc)
        return _fail(503, str(exc)[:300])
    log.info("%s %s %s: done", scope, op, args.get("address") or args.get("id") or "")
    return {"ok": True, "result": result}


def serve_one(config: Config, scope: str, mta: str, rfile: BinaryIO, wfile: BinaryIO) -> None:
    raw = rfile.readline(MAX_REQUEST + 1)
    if len(raw) > MAX_REQUEST:
        reply = _fail(422, f"request longer than {MAX_REQUEST} bytes")
    else:
        reply = handle(config, scope, mta, raw)
    wfile.write(json.dumps(reply).encode() + b"\n")
    wfile.flush()


def serve_forever(config: Config, scope: str, mta: str, listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        conn.settimeout(CONNECTION_TIMEOUT_S)
        try:
            with conn, conn.makefile("rb") as rfile, conn.makefile("wb") as wfile:
                serve_one(config, scope, mta, rfile, wfile)
        except OSError as exc:  # a client that hung up or stalled: the next one
            log.warning("connection dropped: %s", exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatmail-adminctl", description=__doc__.split("\n")[0])
    parser.add_argument("scope", choices=SCOPES)
    parser.add_argument("ini", nargs="?", default=str(DEFAULT_INI_PATH))
    parser.add_argument("--mta", choices=mailqueue.MTAS, default="postfix")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = config_for_main(args.ini)
    if config is None:
        return EXIT_CONFIG
    if os.environ.get("LISTEN_FDS") == "1" and os.environ.get("LISTEN_PID") == str(os.getpid()):
        listener = socket.socket(fileno=SD_LISTEN_FDS_START)
        serve_forever(config, args.scope, args.mta, listener)
    serve_one(config, args.scope, args.mta, sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
