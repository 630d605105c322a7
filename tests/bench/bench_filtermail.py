"""Benchmark filtermail: messages/s through the filter vs. straight into an SMTP server.

    .venv/bin/python tests/bench/bench_filtermail.py [--messages 2000] [--rounds 3]

One client sends ~20 kB OpenPGP/MIME mails, opening one connection per message as
Postfix's ``smtpd_proxy_filter`` does, with 4 connections in parallel, to:

- **sink** (the baseline): a no-op aiosmtpd server that accepts and discards;
- **relay**: a plain aiosmtpd server that forwards every message to the sink, no checks,
  over the same pooled client filtermail uses (isolates what filtering costs);
- **filtermail**: ``filtermail INI outgoing`` (the real console entry point), which checks
  every message and reinjects it into the sink.

All servers are subprocesses. Senders rotate over 500 addresses, so the default rate
limits (burst 10, then 1/s per sender) apply without refusing anything. Rounds alternate
between targets; medians are compared. Throughput on a shared machine swings with other
load, so the CPU time per message of every process (``/proc/<pid>/stat``) is reported
too: the ratio of CPU totals is what throughput converges to when the CPUs are the
bottleneck. filtermail's peak RSS (VmHWM) is read after the rounds and again after a few
~10 MB mails.
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

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "tests" / "chatmaild"))
sys.path.insert(0, str(REPO))

from filtermail_support import encrypted_mail

from chatmaild.config import render_ini
from chatmaild.smtpclient import Connection, Recipient, Reinjector, dot_stuff

TARGET_RATIO = 0.70
DOMAIN = "chat.example.org"
RCPT = "bob@other.example"


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


def serve_aiosmtpd(port: int, forward_port: int | None) -> None:
    """The sink (``forward_port`` None) or the plain relay, run as a subprocess."""
    from aiosmtpd.smtp import SMTP

    class Handler:
        def __init__(self):
            self.reinjector = Reinjector("127.0.0.1", forward_port) if forward_port else None

        async def handle_EHLO(self, server, session, envelope, hostname, responses):
            # Postfix, which the sink stands in for, offers PIPELINING; aiosmtpd reads
            # pipelined commands in order, it merely does not announce it.
            session.host_name = hostname
            return responses[:-1] + ["250-PIPELINING", responses[-1]]

        async def handle_DATA(self, server, session, envelope):
            if self.reinjector is None:
                return "250 2.0.0 Ok: queued"
            rcpts = [Recipient(r) for r in envelope.rcpt_tos]
            return await self.reinjector.send(envelope.mail_from, rcpts, envelope.content)

    async def serve():
        handler = Handler()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="bench"), "127.0.0.1", port
        )
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


async def send_one(port: int, mail_from: str, stuffed: bytes) -> int:
    conn = await Connection.open("127.0.0.1", port, "bench.local")
    try:
        for command in (f"MAIL FROM:<{mail_from}>", f"RCPT TO:<{RCPT}>", "DATA"):
            reply = await conn.command(command)
            if not reply.ok:
                return reply.code
        conn.writer.write(stuffed + b".\r\n")
        reply = await conn.read_reply()
        await conn.command("QUIT")
        return reply.code
    finally:
        conn.close()


async def run_round(
    port: int, messages: list[tuple[str, bytes]], concurrency: int
) -> tuple[float, int]:
    """Send all messages with ``concurrency`` parallel clients; (messages/s, failures)."""
    queue = list(reversed(messages))
    failures = 0

    async def worker():
        nonlocal failures
        while queue:
            sender, stuffed = queue.pop()
            if await send_one(port, sender, stuffed) != 250:
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


class Servers:
    """sink, relay and filtermail subprocesses; stopped on exit."""

    def __init__(self, tmp: Path):
        self.ports = {name: free_port() for name in ("sink", "relay", "filtermail")}
        me = [sys.executable, __file__]
        sink_port = str(self.ports["sink"])
        ini = tmp / "chatmail.ini"
        ini.write_text(
            render_ini(
                {
                    "mail_domain": DOMAIN,
                    "filtermail_smtp_port": self.ports["filtermail"],
                    "postfix_reinject_port": sink_port,
                    "mailboxes_dir": tmp / "mailboxes",
                    "counters_dir": tmp / "counters",
                }
            )
        )
        self.processes: dict[str, subprocess.Popen] = {}
        try:
            self.processes["sink"] = subprocess.Popen([*me, "--serve", sink_port])
            self.processes["relay"] = subprocess.Popen(
                [*me, "--serve", str(self.ports["relay"]), "--forward", sink_port]
            )
            self.processes["filtermail"] = subprocess.Popen(
                [sys.executable, "-m", "chatmaild.filtermail", str(ini), "outgoing"],
                stderr=subprocess.DEVNULL,
                cwd=REPO,
            )
            for name, process in self.processes.items():
                wait_for_port(self.ports[name], process)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            process.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--size", type=int, default=20_000, help="approximate message size")
    parser.add_argument("--senders", type=int, default=500)
    parser.add_argument("--big", type=int, default=6, help="large messages sent at the end")
    parser.add_argument("--big-size", type=int, default=10_000_000)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--forward", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_aiosmtpd(args.serve, args.forward)
        return 0

    # From: must equal the sender, so each sender has its own mail.
    senders = [f"user{i}@{DOMAIN}" for i in range(args.senders)]
    mails = {s: dot_stuff(encrypted_mail(s, RCPT, args.size)) for s in senders}
    messages = [(s, mails[s]) for s in (senders[i % len(senders)] for i in range(args.messages))]
    big = dot_stuff(encrypted_mail("big@" + DOMAIN, RCPT, args.big_size))
    targets = ("sink", "relay", "filtermail")
    # Which processes work for each target (the client is this process).
    involved = {"sink": ["sink"], "relay": ["relay", "sink"], "filtermail": ["filtermail", "sink"]}

    rates: dict[str, list[float]] = {target: [] for target in targets}
    cpu: dict[tuple[str, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        servers = Servers(Path(tmp))
        try:
            filtermail_pid = servers.processes["filtermail"].pid
            rss_start = proc_status(filtermail_pid, "VmRSS")
            pids = {"client": os.getpid()} | {n: p.pid for n, p in servers.processes.items()}
            for _ in range(args.rounds):
                for target in targets:
                    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    rate, failed = asyncio.run(
                        run_round(servers.ports[target], messages, args.concurrency)
                    )
                    if failed:
                        raise SystemExit(f"{target}: {failed} messages not accepted")
                    rates[target].append(rate)
                    for name, pid in pids.items():
                        key = (target, name)
                        cpu[key] = cpu.get(key, 0.0) + cpu_seconds(pid) - before[name]
            peak_small = proc_status(filtermail_pid, "VmHWM")
            rss_small = proc_status(filtermail_pid, "VmRSS")
            big_messages = [("big@" + DOMAIN, big)] * args.big
            _, failed = asyncio.run(run_round(servers.ports["filtermail"], big_messages, 2))
            if failed:
                raise SystemExit(f"{failed} large messages not accepted")
            peak_big = proc_status(filtermail_pid, "VmHWM")
        finally:
            servers.stop()

    total = args.messages * args.rounds
    median = {target: statistics.median(rates[target]) for target in targets}
    cpu_ms = {
        target: {name: cpu[target, name] / total * 1e3 for name in ["client", *involved[target]]}
        for target in targets
    }
    cpu_total = {target: sum(cpu_ms[target].values()) for target in targets}

    def verdict(ratio: float) -> str:
        return "met" if ratio >= TARGET_RATIO else "NOT met"

    print(
        f"{len(messages[0][1])}-byte encrypted mails, {args.messages} per round x {args.rounds} "
        f"rounds, {args.concurrency} parallel clients, one connection per message, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    for target in targets:
        per_process = ", ".join(f"{n} {v:.2f}" for n, v in cpu_ms[target].items())
        print(
            f"{target:>10}: " + ", ".join(f"{r:4.0f}" for r in rates[target]) + " msg/s; "
            f"CPU ms/message: {per_process} (total {cpu_total[target]:.2f})"
        )
    for baseline in ("sink", "relay"):
        ratio = median["filtermail"] / median[baseline]
        cpu_ratio = cpu_total[baseline] / cpu_total["filtermail"]
        print(
            f"filtermail vs {baseline}: throughput {median['filtermail']:.0f} / "
            f"{median[baseline]:.0f} msg/s = {ratio:.0%} ({verdict(ratio)} >= {TARGET_RATIO:.0%}); "
            f"CPU-bound {cpu_ratio:.0%} ({verdict(cpu_ratio)})"
        )
    print(
        f"filtermail RSS: {rss_start / 1024:.1f} MiB at start, {rss_small / 1024:.1f} MiB after "
        f"{total} mails (peak {peak_small / 1024:.1f} MiB); peak {peak_big / 1024:.1f} MiB "
        f"after {args.big} more of {len(big) / 1e6:.0f} MB, 2 at a time"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
