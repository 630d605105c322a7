"""Load and fault campaign against an applied relay: nothing the relay accepted may be lost.

Real clients over TLS on 127.0.0.1: IMAP IDLE sessions hold the relay the way Delta Chat
devices do; senders submit encrypted messages on 587 at a steady rate, retrying a 4xx or a
broken connection as a mail client would; receivers IDLE on their INBOX and note when each
Message-ID appears. Each phase applies one fault a third of the way in (kill -9 of a
daemon, a restart, a dependency stopped for a while, the whole container killed and booted
again), stops sending, and waits until every accepted message has arrived or the grace time
has passed. At the end every receiver's INBOX is read once more and each message is
counted: delivered once, refused with a reply the sender saw, deferred (the sender still saw
only 4xx or errors when it gave up), lost (accepted, never delivered), duplicated.

Used by ``test_campaign.py`` (a reduced run in CI) and ``tests/bench/bench_campaign.py``
(the full run: 2,000 IDLE sessions, CPU and memory per service).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import resource
import secrets
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import aiosmtplib
from relayclient import HOST, RelayClient, encrypted_mail, unverified_context

#: Dovecot allows 10 connections per user and client address (mail_max_userip_connections).
IDLE_SESSIONS_PER_ACCOUNT = 8
#: An account may send max_user_send_per_minute (default 60) messages: stay well below.
MESSAGES_PER_SENDER_PER_SECOND = 0.5
_MESSAGE_ID = re.compile(rb"Message-ID:\s*(<[^>\s]+>)", re.IGNORECASE)
_UID = re.compile(rb"UID (\d+)")
_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")


class ImapError(Exception):
    """A tagged NO/BAD answer."""


class Imap:
    """The few IMAP commands the campaign needs, over asyncio (thousands of sessions)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer, self.tag = reader, writer, 0

    @classmethod
    async def login(cls, addr: str, password: str, ctx: ssl.SSLContext, timeout: float = 30):
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, 993, ssl=ctx), timeout
        )
        conn = cls(reader, writer)
        try:
            await asyncio.wait_for(reader.readline(), timeout)
            await asyncio.wait_for(conn.command(f'LOGIN "{addr}" "{password}"'), timeout)
            await asyncio.wait_for(conn.command("SELECT INBOX"), timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _line(self) -> bytes:
        line = await self.reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        literal = _LITERAL.search(line)
        if literal:
            line += await self.reader.readexactly(int(literal.group(1)))
        return line

    async def command(self, text: str) -> list[bytes]:
        self.tag += 1
        tag = f"c{self.tag} ".encode()
        self.writer.write(tag + text.encode() + b"\r\n")
        await self.writer.drain()
        lines = []
        while True:
            line = await self._line()
            if line.startswith(tag):
                if not line[len(tag) :].startswith(b"OK"):
                    raise ImapError(line.decode(errors="replace").strip())
                return lines
            lines.append(line)

    async def idle(self, seconds: float, stop: asyncio.Event) -> None:
        """IDLE until something is announced, ``seconds`` pass or ``stop`` is set."""
        self.tag += 1
        tag = f"c{self.tag} ".encode()
        self.writer.write(tag + b"IDLE\r\n")
        await self.writer.drain()
        if not (await self._line()).startswith(b"+"):
            raise ImapError("IDLE refused")
        deadline = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                line = await asyncio.wait_for(self._line(), 0.5)
            except asyncio.TimeoutError:
                continue
            if b"EXISTS" in line:
                break
        self.writer.write(b"DONE\r\n")
        await self.writer.drain()
        while not (await self._line()).startswith(tag):
            pass

    async def message_ids(self, after_uid: int) -> list[tuple[int, str]]:
        lines = await self.command(
            f"UID FETCH {after_uid + 1}:* (UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])"
        )
        found = []
        for line in lines:
            uid, msgid = _UID.search(line), _MESSAGE_ID.search(line)
            if uid and msgid and int(uid.group(1)) > after_uid:
                found.append((int(uid.group(1)), msgid.group(1).decode()))
        return found

    def close(self) -> None:
        self.writer.close()


@dataclass
class Message:
    msgid: str
    sender: tuple[str, str]
    recipient: str
    status: str = "unsent"  # accepted | refused | deferred
    reply: str = ""
    attempts: int = 0
    queued_at: float = 0.0  # when the client wanted to send it: latency counts from here
    accepted_at: float = 0.0


@dataclass
class PhaseReport:
    name: str
    sent: int = 0
    delivered: int = 0
    refused: int = 0
    deferred: int = 0
    lost: int = 0
    duplicated: int = 0
    refused_but_delivered: int = 0
    latencies: list[float] = field(default_factory=list)
    #: messages accepted per second, from the phase's first send to its last acceptance
    accepted_rate: float = 0.0
    note: str = ""

    def latency(self, quantile: float) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(len(lat) * quantile))] if lat else float("nan")

    def line(self) -> str:
        p50, p99 = f"{self.latency(0.5):.2f}", f"{self.latency(0.99):.2f}"
        return (
            f"{self.name:<28} sent {self.sent:>5}  delivered {self.delivered:>5}  "
            f"refused {self.refused:>3}  deferred {self.deferred:>3}  lost {self.lost:>3}  "
            f"duplicated {self.duplicated:>3}  latency p50 {p50} s p99 {p99} s  "
            f"accepted {self.accepted_rate:.1f}/s {self.note}"
        )


@dataclass
class Fault:
    name: str
    apply: Callable[[], str | None]  # blocking; may return a note for the report


class Campaign:
    def __init__(
        self,
        relay: RelayClient,
        idle_sessions: int = 100,
        rate: float = 4.0,
        receivers: int = 8,
        retry_for: float = 120.0,
        grace: float = 60.0,
    ):
        self.relay = relay
        self.idle_sessions = idle_sessions
        self.rate = rate
        self.retry_for, self.grace = retry_for, grace
        self.ctx = unverified_context()
        self.senders = [relay.gencreds() for _ in range(max(1, round(rate / MESSAGES_PER_SENDER_PER_SECOND)))]
        self.receivers = [relay.gencreds() for _ in range(receivers)]
        self.idle_accounts = [
            relay.gencreds() for _ in range(-(-idle_sessions // IDLE_SESSIONS_PER_ACCOUNT))
        ]
        self.messages: dict[str, Message] = {}
        self.phase_of: dict[str, str] = {}
        self.seen_at: dict[str, float] = {}
        self.idle_alive = 0
        self.idle_min_alive: int | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # background load

    async def start(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
        # Every account is created by its first login, a few at a time.
        limit = asyncio.Semaphore(16)

        async def create(account):
            async with limit:
                conn = await Imap.login(*account, self.ctx)
                conn.close()

        await asyncio.gather(*(create(a) for a in self.senders + self.receivers + self.idle_accounts))
        for i in range(self.idle_sessions):
            account = self.idle_accounts[i // IDLE_SESSIONS_PER_ACCOUNT]
            self._tasks.append(asyncio.create_task(self._idle_session(account, i)))
        for account in self.receivers:
            self._tasks.append(asyncio.create_task(self._receiver(account)))
        deadline = time.monotonic() + 60 + self.idle_sessions / 20
        while self.idle_alive < self.idle_sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _idle_session(self, account, index: int) -> None:
        await asyncio.sleep(index * 0.01)  # spread the logins
        while not self._stop.is_set():
            conn = None
            try:
                conn = await Imap.login(*account, self.ctx)
                self.idle_alive += 1
                try:
                    while not self._stop.is_set():
                        await conn.idle(25, self._stop)
                finally:
                    self.idle_alive -= 1
            except (OSError, ConnectionError, ImapError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                await asyncio.sleep(1 + secrets.randbelow(1000) / 1000)
            finally:
                if conn:
                    conn.close()

    async def _receiver(self, account) -> None:
        last_uid = 0
        while not self._stop.is_set():
            conn = None
            try:
                conn = await Imap.login(*account, self.ctx)
                while not self._stop.is_set():
                    found = await conn.message_ids(last_uid)
                    now = time.monotonic()
                    for uid, msgid in found:
                        self.seen_at.setdefault(msgid, now)
                        last_uid = max(last_uid, uid)
                    await conn.idle(25, self._stop)
            except (OSError, ConnectionError, ImapError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                await asyncio.sleep(0.5)
            finally:
                if conn:
                    conn.close()

    # sending

    async def _sender(self, account, queue: asyncio.Queue, retry_until: list[float]) -> None:
        addr, password = account
        smtp = None
        while True:
            message = await queue.get()
            if message is None:
                break
            while True:
                message.attempts += 1
                try:
                    if smtp is None:
                        smtp = aiosmtplib.SMTP(
                            hostname=HOST, port=587, start_tls=True, tls_context=self.ctx, timeout=30
                        )
                        await smtp.connect()
                        await smtp.login(addr, password)
                    body = encrypted_mail(addr, [message.recipient], message.msgid)
                    await smtp.sendmail(addr, [message.recipient], body)
                    message.status, message.accepted_at = "accepted", time.monotonic()
                    break
                except aiosmtplib.SMTPResponseException as exc:
                    message.reply = f"{exc.code} {exc.message}"
                    if 500 <= exc.code < 600 and exc.code != 535:
                        message.status = "refused"
                        break
                    smtp = await _drop(smtp)
                except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError) as exc:
                    message.reply = f"{type(exc).__name__}: {exc}"
                    smtp = await _drop(smtp)
                if time.monotonic() > retry_until[0]:
                    message.status = "deferred"
                    break
                await asyncio.sleep(1)
        await _drop(smtp)

    async def phase(self, name: str, seconds: float, fault: Fault | None) -> str:
        """Send for ``seconds`` at the campaign's rate, apply ``fault`` a third of the way in."""
        queues = [asyncio.Queue() for _ in self.senders]
        retry_until = [float("inf")]
        workers = [
            asyncio.create_task(self._sender(account, queue, retry_until))
            for account, queue in zip(self.senders, queues)
        ]
        self.idle_min_alive = self.idle_alive
        note_holder: list[str | None] = [None]

        async def run_fault():
            await asyncio.sleep(seconds / 3)
            note_holder[0] = await asyncio.to_thread(fault.apply)

        fault_task = asyncio.create_task(run_fault()) if fault else None
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        started = time.monotonic()
        count = int(seconds * self.rate)
        for i in range(count):
            await asyncio.sleep(max(0.0, started + i / self.rate - time.monotonic()))
            recipient = self.receivers[i % len(self.receivers)][0]
            msgid = f"<{slug}.{i}.{secrets.token_hex(4)}@{self.relay.domain}>"
            message = Message(
                msgid, self.senders[i % len(self.senders)], recipient, queued_at=time.monotonic()
            )
            self.messages[msgid] = message
            self.phase_of[msgid] = name
            queues[i % len(queues)].put_nowait(message)
            self.idle_min_alive = min(self.idle_min_alive, self.idle_alive)
        if fault_task:
            await fault_task
        retry_until[0] = time.monotonic() + self.retry_for
        for queue in queues:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
        # Wait for everything accepted in this phase to be seen by a receiver.
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:
            pending = [
                m for m in self.messages.values()
                if self.phase_of[m.msgid] == name and m.status == "accepted" and m.msgid not in self.seen_at
            ]
            if not pending:
                break
            await asyncio.sleep(0.5)
        return note_holder[0] or ""

    # accounting

    async def count_deliveries(self) -> Counter:
        """Every Message-ID in every receiver's INBOX, counted (the final word on delivery)."""
        counts: Counter = Counter()
        for account in self.receivers:
            conn = await Imap.login(*account, self.ctx)
            try:
                counts.update(msgid for _, msgid in await conn.message_ids(0))
            finally:
                conn.close()
        return counts

    def report(self, phases: list[tuple[str, str]], counts: Counter) -> list[PhaseReport]:
        reports = {name: PhaseReport(name, note=note) for name, note in phases}
        for msgid, message in self.messages.items():
            rep = reports[self.phase_of[msgid]]
            rep.sent += 1
            delivered = counts.get(msgid, 0)
            if delivered > 1:
                rep.duplicated += 1
            if message.status == "refused":
                if delivered:
                    rep.refused_but_delivered += 1
                else:
                    rep.refused += 1
                continue
            if delivered:
                rep.delivered += 1
                if message.status == "accepted" and msgid in self.seen_at:
                    rep.latencies.append(self.seen_at[msgid] - message.queued_at)
            elif message.status == "accepted":
                rep.lost += 1
            else:
                rep.deferred += 1
        for rep in reports.values():
            phase = [m for m in self.messages.values() if self.phase_of[m.msgid] == rep.name]
            accepted = [m.accepted_at for m in phase if m.status == "accepted"]
            if accepted:
                span = max(accepted) - min(m.queued_at for m in phase)
                rep.accepted_rate = len(accepted) / max(span, 1e-3)
        return list(reports.values())


async def _drop(smtp):
    if smtp is not None:
        try:
            smtp.close()
        except Exception:  # noqa: BLE001 - closing a broken connection
            pass
    return None


# --- faults ------------------------------------------------------------------------------


def standard_faults(relay: RelayClient, outage: float = 8.0) -> list[Fault]:
    """The hardening issue's faults, for the relay's platform, one per phase."""
    container, platform = relay.container, relay.platform

    def command(cmd):
        def apply():
            container.run(cmd)
        return apply

    def systemctl(*args):
        return command(["systemctl", *args])

    def stopped_for(unit):
        def apply():
            container.run(["systemctl", "stop", unit])
            time.sleep(outage)
            container.run(["systemctl", "start", unit])
        return apply

    def kill9(unit):
        return command(f"kill -KILL $(systemctl show --property=MainPID --value {unit})")

    daemons = ["doveauth.service", "chatmail-metadata.service", "lastlogin.service", "chatmail-api.service"]
    if platform.mta == "postfix":
        daemons += ["filtermail.service", "filtermail-incoming.service"]
    faults = [Fault(f"kill -9 {unit.removesuffix('.service')}", kill9(unit)) for unit in daemons]
    if platform.mta == "opensmtpd":
        faults.append(
            Fault("kill -9 smtpd filter", command(["pkill", "-KILL", "-f", "chatmail-smtpd-filter"]))
        )
    if container.mail_fs.is_mount():
        faults.append(Fault("mailbox filesystem full", lambda: fill_for(container.mail_fs, outage)))
    faults += [
        Fault("restart dovecot", systemctl("restart", "dovecot.service")),
        # The unit the operator restarts (Debian 12's postfix.service restarts postfix@-).
        Fault(f"restart {platform.mta}", systemctl("restart", platform.mta_unit)),
        Fault("resolver down", stopped_for("unbound.service")),
    ]
    if platform.mta == "postfix":
        faults.append(Fault("opendkim down", stopped_for("opendkim.service")))
    faults.append(Fault("container killed, booted", lambda: crash_and_boot(container)))
    return faults


def fill_for(mount: Path, seconds: float) -> str:
    """Fill the mailbox filesystem to the last block, hold it full, free it again."""
    filler = mount / "campaign-filler"
    chunk = bytes(1 << 20)
    written = 0
    try:
        with open(filler, "wb", buffering=0) as out:
            while True:
                try:
                    written += out.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    if len(chunk) == 1:
                        break
                    chunk = chunk[: len(chunk) // 2]  # down to the last free byte
            os.fsync(out.fileno())
        time.sleep(seconds)
    finally:
        filler.unlink(missing_ok=True)
    return f"({written >> 20} MiB filled)"


def crash_and_boot(container) -> str:
    """SIGKILL the whole container mid-delivery, boot it from the same disk, wait for it."""
    started = time.monotonic()
    container.crash()
    container.boot()
    container.wait_for_services()
    return f"(down {time.monotonic() - started:.0f} s)"


#: Run inside the container: CPU seconds (of live processes and their reaped children) and
#: PSS bytes per systemd unit, from /proc. The test host's cgroup v1 gives the container no
#: per-unit cpu or memory controller, so /proc is what there is.
USAGE_SCRIPT = r"""
import json, os, re
ticks = os.sysconf("SC_CLK_TCK")
usage = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        unit = re.search(r"/([^/\n]+\.service)", open(f"/proc/{pid}/cgroup").read())
        stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        pss = re.search(r"^Pss:\s+(\d+)", open(f"/proc/{pid}/smaps_rollup").read(), re.M)
    except OSError:
        continue
    if unit:
        entry = usage.setdefault(unit.group(1), [0.0, 0])
        entry[0] += sum(int(v) for v in stat[11:15]) / ticks  # utime stime cutime cstime
        entry[1] += int(pss.group(1)) * 1024 if pss else 0
print(json.dumps(usage))
"""


def service_usage(container, units: list[str]) -> dict[str, tuple[float, int]]:
    """(CPU seconds so far, PSS bytes now) per unit."""
    usage = json.loads(container.run(["python3", "-"], input=USAGE_SCRIPT).stdout)
    return {unit: tuple(usage[unit]) for unit in units if unit in usage}


async def run(
    relay: RelayClient,
    faults: list[Fault],
    seconds: float,
    idle_sessions: int,
    rate: float,
    log: Callable[[str], None] = print,
) -> tuple[list[PhaseReport], Campaign]:
    campaign = Campaign(relay, idle_sessions=idle_sessions, rate=rate)
    await campaign.start()
    log(f"{campaign.idle_alive} of {idle_sessions} IDLE sessions up; {len(campaign.senders)} senders")
    phases = []
    try:
        for fault in [None, *faults]:
            name = fault.name if fault else "no fault"
            note = await campaign.phase(name, seconds, fault)
            note += f" idle>={campaign.idle_min_alive}"
            phases.append((name, note))
            log(f"phase {name!r} done {note}")
        counts = await campaign.count_deliveries()
    finally:
        await campaign.stop()
    return campaign.report(phases, counts), campaign
