"""Benchmark: the whole relay, applied by Salt into a fresh systemd-nspawn container.

Measures, each against a baseline from the same run:
- first `state.apply chatmail` vs. the second one (nothing to change);
- account creation by first IMAP login / first SMTP login vs. logging in again;
- Delta Chat ping-pong (median of 5 rounds, two real deltachat-rpc-server profiles) vs.
  two raw one-way deliveries (SMTP submission until the mail is visible over IMAP);
- idle memory (RSS and PSS, all processes of each service's cgroup).

Needs root and free relay ports (25, 80, 143, 443, 465, 587, 993, ...). The container is
removed at the end (also on Ctrl-C).

Usage: .venv/bin/python tests/bench/bench_relay.py [--rounds 5] [--logins 10]
       [--platform debian12-postfix|debian13-opensmtpd]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from benchsupport import applied_relay, platform_argument
import relayctl
from relayclient import (
    RelayClient,
    encrypted_mail,
    message_id,
    online_account,
    ping_pong_rounds,
    start_rpc,
)

SERVICES = (
    "postfix@-.service",
    "opensmtpd.service",
    "dovecot.service",
    "nginx.service",
    "unbound.service",
    "opendkim.service",
    "doveauth.service",
    "filtermail.service",
    "filtermail-incoming.service",
    "chatmail-metadata.service",
    "lastlogin.service",
    "chatmail-api.service",
)

# Runs inside the container: RSS and PSS (kB) summed per systemd unit, from /proc. RSS
# counts shared pages once per process (Postfix and Dovecot run many); PSS splits them.
RSS_SCRIPT = r"""
import os, re, json
mem = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        cgroup = open(f"/proc/{pid}/cgroup").read()
        rollup = open(f"/proc/{pid}/smaps_rollup").read()
    except OSError:
        continue
    unit = re.search(r"/([^/\n]+\.service)", cgroup)
    rss = re.search(r"^Rss:\s+(\d+)", rollup, re.M)
    pss = re.search(r"^Pss:\s+(\d+)", rollup, re.M)
    if unit and rss and pss:
        entry = mem.setdefault(unit.group(1), [0, 0, 0])
        entry[0] += int(rss.group(1))
        entry[1] += int(pss.group(1))
        entry[2] += 1
print(json.dumps(mem))
"""


def timed(func) -> float:
    started = time.perf_counter()
    func()
    return time.perf_counter() - started


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.0f} ms"


def bench_logins(relay: RelayClient, count: int) -> None:
    for proto in ("imap", "smtp"):
        creds = [relay.gencreds() for _ in range(count)]

        def login(addr, password, proto=proto):
            if proto == "imap":
                with relay.imap(addr, password):
                    pass
            else:
                with relay.smtp(465, addr, password):
                    pass

        create = [timed(lambda c=c: login(*c)) for c in creds]
        again = [timed(lambda c=c: login(*c)) for c in creds]
        print(
            f"{proto} login creating the account: median {ms(median(create))}   "
            f"existing account: {ms(median(again))}   "
            f"ratio {median(create) / median(again):.2f}"
        )


def one_way_delivery(relay: RelayClient, sender, rcpt) -> float:
    msgid = message_id(relay.domain)
    started = time.perf_counter()
    relay.send(465, *sender, [rcpt[0]], encrypted_mail(sender[0], [rcpt[0]], msgid))
    relay.fetch_inbox_message(*rcpt, msgid, poll=0.02)
    return time.perf_counter() - started


def bench_ping_pong(relay: RelayClient, rounds: int) -> None:
    sender, rcpt = relay.new_account(), relay.new_account()
    raw = [one_way_delivery(relay, sender, rcpt) for _ in range(rounds)]
    from deltachat_rpc_client import DeltaChat

    with tempfile.TemporaryDirectory() as accounts:
        rpc = start_rpc(Path(accounts) / "dc")
        try:
            dc = DeltaChat(rpc)
            ac1, ac2 = online_account(dc, relay), online_account(dc, relay)
            chat21, chat12 = ac2.create_chat(ac1), ac1.create_chat(ac2)
            rounds_s = ping_pong_rounds(ac1, ac2, chat12, chat21, rounds)
        finally:
            rpc.close()
    base = 2 * median(raw)
    print(
        f"Delta Chat ping-pong: median {ms(median(rounds_s))} over {rounds} "
        f"(min {ms(min(rounds_s))}, max {ms(max(rounds_s))})"
    )
    print(
        f"baseline 2 x raw SMTP->IMAP delivery (20 ms polling): {ms(base)}   "
        f"ratio {median(rounds_s) / base:.2f}"
    )


def print_rss(container: relayctl.Relay) -> None:
    time.sleep(5)  # let the services settle after the last test traffic
    mem = json.loads(container.run(["python3", "-c", RSS_SCRIPT]).stdout)
    total_rss = total_pss = 0
    print("idle memory per service (all processes of the unit):      RSS        PSS  procs")
    for unit in SERVICES:
        if unit not in mem:
            print(f"  {unit:44} not running")
            continue
        rss, pss, procs = mem[unit]
        total_rss, total_pss = total_rss + rss, total_pss + pss
        print(f"  {unit:44} {rss / 1024:7.1f} MiB {pss / 1024:6.1f} MiB {procs:4}")
    print(f"  {'total':44} {total_rss / 1024:7.1f} MiB {total_pss / 1024:6.1f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--logins", type=int, default=10)
    platform_argument(parser)
    args = parser.parse_args()
    print(f"platform: {args.platform}")

    with applied_relay(args.platform) as (relay, first):
        container = relay.container
        second = container.apply()
        print(
            f"first apply (packages, venv, keys): {first.seconds:6.1f} s  "
            f"({len(first.changed)} of {len(first.states)} states changed)"
        )
        print(
            f"second apply (nothing to do):       {second.seconds:6.1f} s  "
            f"({len(second.changed)} changed)   ratio {second.seconds / first.seconds:.2f}"
        )
        bench_logins(relay, args.logins)
        bench_ping_pong(relay, args.rounds)
        print_rss(container)
    return 0


if __name__ == "__main__":
    sys.exit(main())
