"""Benchmark filtermail: messages/s through the filter vs. straight into an SMTP server.

    .venv/bin/python tests/bench/bench_filtermail.py [--messages 2000] [--concurrency 4]

Baseline: the client sends ~20 kB OpenPGP/MIME mails straight into a no-op aiosmtpd
server (a subprocess). Filtered: the same client sends the same mails to ``filtermail INI
outgoing`` (a subprocess, the real console entry point), which checks them and reinjects
them into that same no-op server. Like Postfix's ``smtpd_proxy_filter``, the client opens
one connection per message. Senders rotate over 500 addresses, so the default rate limits
(burst 10, then 1/s per sender) apply without refusing anything. Rounds alternate between baseline and filtered;
the median of each is compared. filtermail's peak RSS (VmHWM) is read from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "tests" / "chatmaild"))
sys.path.insert(0, str(REPO))

from filtermail_support import encrypted_mail  # noqa: E402

from chatmaild.config import render_ini  # noqa: E402
from chatmaild.smtpclient import Connection, dot_stuff  # noqa: E402

TARGET_RATIO = 0.70


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def run_sink(port: int) -> None:
    """The no-op relay: accept everything, keep nothing."""
    from aiosmtpd.smtp import SMTP

    class Accept:
        async def handle_DATA(self, server, session, envelope):
            return "250 2.0.0 Ok: queued"

    async def serve():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Accept(), hostname="sink"), "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


async def send_one(port: int, mail_from: str, rcpt: str, stuffed: bytes) -> int:
    conn = await Connection.open("127.0.0.1", port, "bench.local")
    try:
        for command in (f"MAIL FROM:<{mail_from}>", f"RCPT TO:<{rcpt}>", "DATA"):
            reply = await conn.command(command)
            if not reply.ok:
                return reply.code
        conn.writer.write(stuffed + b".\r\n")
        reply = await conn.read_reply()
        await conn.command("QUIT")
        return reply.code
    finally:
        conn.close()


async def run_round(port: int, messages: list[tuple[str, bytes]], concurrency: int) -> tuple[float, int]:
    """Send all messages with ``concurrency`` parallel clients; (messages/s, failures)."""
    queue = list(reversed(messages))
    failures = 0

    async def worker():
        nonlocal failures
        while queue:
            sender, stuffed = queue.pop()
            if await send_one(port, sender, "bob@other.example", stuffed) != 250:
                failures += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(messages) / (time.perf_counter() - start), failures


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])  # kB
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--size", type=int, default=20_000, help="approximate message size")
    parser.add_argument("--senders", type=int, default=500)
    parser.add_argument("--sink", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        run_sink(args.sink)
        return 0

    domain = "chat.example.org"
    # From: must equal the sender, so each sender has its own mail.
    senders = [f"user{i}@{domain}" for i in range(args.senders)]
    mails = {s: dot_stuff(encrypted_mail(s, "bob@other.example", args.size)) for s in senders}
    messages = [(senders[i % len(senders)], mails[senders[i % len(senders)]]) for i in range(args.messages)]

    children: list[subprocess.Popen] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sink_port, filter_port = free_port(), free_port()
            sink = subprocess.Popen([sys.executable, __file__, "--sink", str(sink_port)])
            children.append(sink)
            wait_for_port(sink_port, sink)
            ini = Path(tmp) / "chatmail.ini"
            ini.write_text(render_ini({
                "mail_domain": domain,
                "filtermail_smtp_port": filter_port,
                "postfix_reinject_port": sink_port,
                "mailboxes_dir": Path(tmp) / "mailboxes",
                "counters_dir": Path(tmp) / "counters",
            }))  # fmt: skip
            filtermail = subprocess.Popen(
                [sys.executable, "-m", "chatmaild.filtermail", str(ini), "outgoing"],
                stderr=subprocess.DEVNULL, cwd=REPO,
            )  # fmt: skip
            children.append(filtermail)
            wait_for_port(filter_port, filtermail)
            rss_start = proc_status(filtermail.pid, "VmRSS")

            baseline, filtered = [], []
            pids = {"client": os.getpid(), "filtermail": filtermail.pid, "sink": sink.pid}
            cpu = {("baseline", name): 0.0 for name in pids} | {("filtered", name): 0.0 for name in pids}
            for _ in range(args.rounds):
                for label, port, rates in (("baseline", sink_port, baseline),
                                           ("filtered", filter_port, filtered)):  # fmt: skip
                    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    rate, failed = asyncio.run(run_round(port, messages, args.concurrency))
                    assert failed == 0, f"{label}: {failed} messages failed"
                    rates.append(rate)
                    for name, pid in pids.items():
                        cpu[label, name] += cpu_seconds(pid) - before[name]
            peak = proc_status(filtermail.pid, "VmHWM")
            rss_end = proc_status(filtermail.pid, "VmRSS")
    finally:
        for child in children:
            child.terminate()
            child.wait(10)

    size = len(messages[0][1])
    base, filt = statistics.median(baseline), statistics.median(filtered)
    ratio = filt / base
    print(f"message size: {size} bytes, {args.messages} messages x {args.rounds} rounds, "
          f"{args.concurrency} concurrent clients, one connection per message, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print("baseline (client -> no-op aiosmtpd):   " + ", ".join(f"{r:.0f}" for r in baseline) + " msg/s")
    print("filtered (client -> filtermail -> sink): " + ", ".join(f"{r:.0f}" for r in filtered) + " msg/s")
    print(f"median: baseline {base:.0f} msg/s, filtered {filt:.0f} msg/s, ratio {ratio:.0%} "
          f"(target >= {TARGET_RATIO:.0%}: {'met' if ratio >= TARGET_RATIO else 'NOT met'})")  # fmt: skip
    total = args.messages * args.rounds
    for label in ("baseline", "filtered"):
        print(f"CPU per message, {label}: " + ", ".join(
            f"{name} {cpu[label, name] / total * 1e3:.2f} ms" for name in pids))  # fmt: skip
    print(f"filtermail RSS: {rss_start / 1024:.1f} MiB at start, {rss_end / 1024:.1f} MiB at end, "
          f"peak (VmHWM) {peak / 1024:.1f} MiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
