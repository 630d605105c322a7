"""Benchmark: the load and fault campaign in full (tests/e2e/campaign.py).

Measures, against a baseline from the same run:
- delivery latency (p50/p99, submission on 587 until an IDLE receiver sees the message) at a
  low rate with no other load, then with 2,000 IMAP IDLE sessions held open (ratio);
- the sustained rate: the offered message rate doubles each step while the relay accepts at
  least 90 % of it, delivers everything and stays under 5 s at p99 (latency counts from when
  the client wanted to send); the last clean step is what the relay sustains, and the
  service that used the most CPU in the first step that failed is where it saturates;
- CPU seconds per service over the loaded run and its memory (PSS) at the end;
- then every fault of the campaign under the 2,000 sessions: sent / delivered / refused /
  deferred / lost / duplicated per fault (lost must be 0).

Needs root and free relay ports. Usage:
    .venv/bin/python tests/bench/bench_campaign.py [--idle 2000] [--seconds 20]
        [--platform debian12-postfix|debian13-postfix|debian13-opensmtpd]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from benchsupport import applied_relay, platform_argument
import campaign

SERVICES = [
    "postfix.service",  # Debian 13's main instance
    "postfix@-.service",  # Debian 12's
    "opensmtpd.service",
    "dovecot.service",
    "opendkim.service",
    "doveauth.service",
    "filtermail.service",
    "filtermail-incoming.service",
    "chatmail-metadata.service",
    "lastlogin.service",
    "chatmail-api.service",
]
MAX_P99_SECONDS = 5.0


async def latency_run(relay, idle: int, rate: float, seconds: float):
    """One campaign phase without a fault: (report, campaign, cpu/memory per service)."""
    run = campaign.Campaign(relay, idle_sessions=idle, rate=rate)
    await run.start()
    before = campaign.service_usage(relay.container, SERVICES)
    try:
        await run.phase(f"{idle} idle, {rate:g}/s", seconds, None)
        counts = await run.count_deliveries()
    finally:
        after = campaign.service_usage(relay.container, SERVICES)
        await run.stop()
    usage = {
        unit: (after[unit][0] - before[unit][0], after[unit][1])
        for unit in after
        if unit in before
    }
    (report,) = run.report([(f"{idle} idle, {rate:g}/s", "")], counts)
    return report, run, usage


def clean(report, offered: float) -> bool:
    return (
        report.delivered == report.sent
        and report.accepted_rate >= 0.9 * offered
        and report.latency(0.99) <= MAX_P99_SECONDS
    )


async def bench(relay, idle: int, seconds: float, faults: bool) -> None:
    quiet, _, _ = await latency_run(relay, 0, 2.0, seconds)
    print(quiet.line())
    loaded, run, usage = await latency_run(relay, idle, 2.0, seconds)
    print(loaded.line())
    print(f"IDLE sessions held: {run.idle_min_alive} of {idle} (minimum during the phase)")
    ratio = loaded.latency(0.5) / quiet.latency(0.5)
    print(f"p50 latency with {idle} IDLE sessions vs none: ratio {ratio:.2f}")
    print("CPU seconds and memory (PSS at the end) per service, loaded run:")
    for unit, (cpu, pss) in sorted(usage.items(), key=lambda item: -item[1][0]):
        print(f"  {unit:32} {cpu:7.2f} s  {pss / 2**20:7.1f} MiB")

    rate, sustained = 4.0, None
    while rate <= 1024:
        report, _, usage = await latency_run(relay, idle, rate, seconds)
        print(report.line())
        if not clean(report, rate):
            busiest = max(usage.items(), key=lambda item: item[1][0])[0] if usage else "?"
            print(f"saturates at {rate:g}/s: most CPU in {busiest}")
            break
        sustained, rate = rate, rate * 2
    print(f"sustained rate: {sustained or '< 4'} messages/s with {idle} IDLE sessions")
    if not faults:
        return
    reports, _ = await campaign.run(
        relay, campaign.standard_faults(relay), seconds, idle, 4.0, log=print
    )
    for report in reports:
        print(report.line())
    print(f"lost in total: {sum(r.lost for r in reports)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--no-faults", action="store_true", help="load measurements only")
    platform_argument(parser)
    args = parser.parse_args()
    print(f"platform: {args.platform}")
    with applied_relay(args.platform) as (relay, _):
        asyncio.run(bench(relay, args.idle, args.seconds, not args.no_faults))
    return 0


if __name__ == "__main__":
    sys.exit(main())
