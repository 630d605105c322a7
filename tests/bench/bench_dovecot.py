"""Benchmark: message latency with Debian's Dovecot vs. our patched build, in one run.

One container relay per run: applied with Debian's Dovecot (`dovecot:packages debian`), then
re-applied with our build (`patched`, scripts/build-dovecot; built first if not cached) on
the same container. For each, with two fresh real Delta Chat profiles (deltachat-rpc-server):
- ping-pong: ac1 -> ac2 and back, each side waiting for the other's message (median; rounds
  relayclient.ROUND_PAUSE apart, below Delta Chat's own send rate limit);
- send 10 / receive 10: ac1 sends 10 messages at once, until ac2 has all 10 (median).
Stock is the baseline: the ratio is patched / stock.

Usage: .venv/bin/python tests/bench/bench_dovecot.py [--rounds 9] [--platform debian13-postfix]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from benchsupport import DOMAIN, applied_relay, platform_argument
import dovecotbuild
import relayctl
from relayclient import PLATFORMS, online_account, ping_pong_rounds, start_rpc

BURST = 10


def send_burst(ac1, ac2, chat12, text: str) -> float:
    """Seconds from the first of BURST sends until ac2 has received all of them."""
    started = time.monotonic()
    for i in range(BURST):
        chat12.send_text(f"{text} {i}")
    received = set()
    while len(received) < BURST:
        received.add(ac2.wait_for_incoming_msg().get_snapshot().text)
    return time.monotonic() - started


def measure(relay, rounds: int) -> tuple[list[float], list[float]]:
    from deltachat_rpc_client import DeltaChat

    with tempfile.TemporaryDirectory() as accounts:
        rpc = start_rpc(Path(accounts) / "dc")
        try:
            dc = DeltaChat(rpc)
            ac1, ac2 = online_account(dc, relay), online_account(dc, relay)
            chat21, chat12 = ac2.create_chat(ac1), ac1.create_chat(ac2)
            pings = ping_pong_rounds(ac1, ac2, chat12, chat21, rounds)
            bursts = [send_burst(ac1, ac2, chat12, f"burst {i}") for i in range(rounds)]
        finally:
            rpc.close()
    return pings, bursts


def installed_dovecot(container) -> str:
    return container.run(["dpkg-query", "-W", "-f=${Version}", "dovecot-core"]).stdout.strip()


def apply_dovecot(container, platform, packages: str) -> None:
    pillar = relayctl.local_relay_pillar(DOMAIN, mta=platform.mta)
    pillar["chatmail"]["dovecot"] = {"packages": packages}
    container.configure_salt(pillar)
    result = container.apply()
    if not result.ok:
        raise relayctl.RelayError(result.summary())
    container.wait_for_services()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:6.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    platform_argument(parser)
    args = parser.parse_args()
    print(f"platform: {args.platform}")
    suite = {p.id: p.suite for p in PLATFORMS}[args.platform]
    repo = dovecotbuild.ensure_built(suite)  # before the relay holds the ports
    with applied_relay(args.platform) as (relay, _):
        container = relay.container
        results = {}
        for packages in ("debian", "patched"):
            if packages == "patched":
                container.provide_dovecot_packages(repo)
                apply_dovecot(container, relay.platform, packages)
            version = installed_dovecot(container)
            pings, bursts = measure(relay, args.rounds)
            results[packages] = (median(pings), median(bursts))
            print(
                f"{packages:8} dovecot-core {version}\n"
                f"         ping-pong median {ms(median(pings))} "
                f"(min {ms(min(pings))}, max {ms(max(pings))}, {args.rounds} rounds)\n"
                f"         send {BURST} / receive {BURST} median {ms(median(bursts))} "
                f"(min {ms(min(bursts))}, max {ms(max(bursts))})"
            )
        (stock_ping, stock_burst), (ping, burst) = results["debian"], results["patched"]
        print(
            f"patched / stock: ping-pong {ping / stock_ping:.2f}, "
            f"send {BURST} / receive {BURST} {burst / stock_burst:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
