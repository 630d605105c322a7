"""The MTA's queue for the operator: list it, flush it, delete one message.

Postfix (``postqueue -j``, ``postqueue -f``, ``postsuper -d``) and OpenSMTPD
(``smtpctl show queue``, ``schedule all``, ``remove``) give the same entries: id, arrival
time, size (None where the MTA does not list it), recipient domains (never addresses)
and the last delivery error. Deleting needs root under both MTAs, so this runs in the
root half of ``chatmail-adminctl`` with exactly these commands.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import asdict, dataclass

MTAS = ("postfix", "opensmtpd")
#: Postfix short (hex) and long queue ids, OpenSMTPD message (8 hex) and envelope ids.
QUEUE_ID_RE = re.compile(r"[0-9A-Za-z]{6,32}")
COMMAND_TIMEOUT_S = 30.0
#: Entries listed at most: a queue of a million messages must not fill the API's memory.
MAX_ENTRIES = 10_000
MAX_ERROR = 300


class QueueError(RuntimeError):
    """The MTA's command failed; the message says which and why."""


@dataclass
class QueueEntry:
    id: str
    arrival: int
    size: int | None
    recipient_domains: list[str]
    last_error: str | None

    def as_dict(self) -> dict:
        return asdict(self)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def parse_postqueue(stdout: str) -> list[QueueEntry]:
    entries = []
    for line in stdout.splitlines():
        if not line.strip() or len(entries) >= MAX_ENTRIES:
            continue
        message = json.loads(line)
        recipients = message.get("recipients") or []
        errors = [str(r["delay_reason"]) for r in recipients if r.get("delay_reason")]
        entries.append(
            QueueEntry(
                id=str(message["queue_id"]),
                arrival=int(message.get("arrival_time") or 0),
                size=int(message["message_size"]) if "message_size" in message else None,
                recipient_domains=sorted({_domain(str(r.get("address", ""))) for r in recipients}),
                last_error=errors[-1][:MAX_ERROR] if errors else None,
            )
        )
    return entries


def parse_smtpctl(stdout: str) -> list[QueueEntry]:
    """``smtpctl show queue``: one envelope (recipient) per line, grouped by message:
    ``envid|src|agent|status|sender|rcpt|dest|creation|expire|lasttry|retry|runstate|error``."""
    messages: dict[str, QueueEntry] = {}
    for line in stdout.splitlines():
        fields = line.split("|", 12)
        if len(fields) < 13:
            continue
        msgid = fields[0][:8]
        entry = messages.get(msgid)
        if entry is None:
            if len(messages) >= MAX_ENTRIES:
                continue
            entry = messages[msgid] = QueueEntry(msgid, int(fields[7] or 0), None, [], None)
        domain = _domain(fields[6])
        if domain not in entry.recipient_domains:
            entry.recipient_domains.append(domain)
            entry.recipient_domains.sort()
        if fields[12].strip():
            entry.last_error = fields[12].strip()[:MAX_ERROR]
    return list(messages.values())


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QueueError(f"{argv[0]}: {exc}") from None
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise QueueError(f"{' '.join(argv)} exited with {done.returncode}: {why[0][:200]}")
    return done.stdout


def list_queue(mta: str) -> list[QueueEntry]:
    if mta == "postfix":
        return parse_postqueue(_run(["postqueue", "-j"]))
    return parse_smtpctl(_run(["smtpctl", "show", "queue"]))


def flush_queue(mta: str) -> None:
    _run(["postqueue", "-f"] if mta == "postfix" else ["smtpctl", "schedule", "all"])


def delete_message(mta: str, queue_id: str) -> bool:
    """Delete one message; False if the queue holds no message with that id."""
    if not isinstance(queue_id, str) or not QUEUE_ID_RE.fullmatch(queue_id):
        raise ValueError("a queue id is 6 to 32 letters and digits")
    if not any(e.id == queue_id for e in list_queue(mta)):
        return False
    _run(["postsuper", "-d", queue_id] if mta == "postfix" else ["smtpctl", "remove", queue_id])
    return True
