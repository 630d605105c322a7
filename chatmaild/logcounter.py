"""``chatmail-logcounter``: what upstream's mtail counted from the journal, as counters
the control API exports (``/metrics``) like every daemon's.

Every few seconds it reads the journal entries since its last read (``journalctl
--cursor-file``) and counts lines by the same patterns upstream's ``delivered_mail.mtail``
used, so the numbers mean the same. Why a cursor and not ``journalctl --follow``: the
cursor file (next to the counters) makes a restart count every line once, and ``--follow``
never wakes up under ``ProtectControlGroups``/``ProtectKernelTunables`` in a container
(seen in systemd-nspawn on cgroup v1: it prints nothing, while a plain read works).

=========================  =====================================================
counter                    log line
=========================  =====================================================
delivered_mail_total       Dovecot LMTP ``saved mail to INBOX`` (a local delivery)
quota_exceeded_total       ``Quota exceeded (mailbox for user is full)``
dkim_signed_total          OpenDKIM ``DKIM-Signature field added`` (outgoing mail)
mailer_daemon_mail_total   filtermail ``Incoming: Filtering mailer-daemon message``
postfix_noqueue_total      ``postfix/...: NOQUEUE: reject`` (refused before queueing)
=========================  =====================================================

Only the counts are kept, never a line. Usage: ``chatmail-logcounter INI [--stdin]``.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from .config import DEFAULT_INI_PATH, EXIT_CONFIG, config_for_main
from .counters import Counters

log = logging.getLogger(__name__)

PATTERNS = (
    ("delivered_mail_total", re.compile(r"saved mail to INBOX$")),
    ("quota_exceeded_total", re.compile(r"Quota exceeded \(mailbox for user is full\)")),
    ("dkim_signed_total", re.compile(r"DKIM-Signature field added")),
    ("mailer_daemon_mail_total", re.compile(r"Incoming: Filtering mailer-daemon message")),
    ("postfix_noqueue_total", re.compile(r"postfix/.*NOQUEUE")),
)
JOURNALCTL = ["journalctl", "--output=short-iso", "--no-pager", "--quiet"]
POLL_INTERVAL_S = 5.0
#: Longer lines are cut: a hostile peer's text must not grow our memory.
MAX_LINE = 16 * 1024


def count_lines(lines: Iterable[str], counters: Counters) -> None:
    for line in lines:
        line = line[:MAX_LINE].rstrip("\n")
        for name, pattern in PATTERNS:
            if pattern.search(line):
                counters.inc(name)
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatmail-logcounter", description=__doc__.split("\n")[0])
    parser.add_argument("ini", nargs="?", default=str(DEFAULT_INI_PATH))
    parser.add_argument("--stdin", action="store_true", help="count lines from stdin")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = config_for_main(args.ini)
    if config is None:
        return EXIT_CONFIG
    counters = Counters(config.counters_dir, "logcounter")
    try:
        if args.stdin:
            count_lines(sys.stdin, counters)
            return 0
        cursor = Path(config.counters_dir) / "logcounter.cursor"
        log.info("counting journal lines every %.0f s (cursor %s)", POLL_INTERVAL_S, cursor)
        while True:
            if not read_new_entries(cursor, counters):
                return 1
            time.sleep(POLL_INTERVAL_S)
    finally:
        counters.flush()


def read_new_entries(cursor: Path, counters: Counters) -> bool:
    """Count the entries after ``cursor`` (the first run starts at the journal's end)."""
    since = [] if cursor.exists() else ["--lines=0"]
    cmd = [*JOURNALCTL, f"--cursor-file={cursor}", *since]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, errors="replace") as journal:
        count_lines(journal.stdout, counters)
    if journal.returncode:
        log.error("%s exited with %s", " ".join(cmd), journal.returncode)
    return journal.returncode == 0


if __name__ == "__main__":
    sys.exit(main())
