"""Benchmark: a fleet of two relays applied from a salt master, and Delta Chat between them.

Measures, each against a baseline from the same run:
- Delta Chat ping-pong between relay1 (Debian 12, Postfix) and relay2 (Debian 13,
  OpenSMTPD), median of N rounds, vs. the same ping-pong between two profiles on relay1;
  the clients run in the lab's client namespace (lab DNS, lab CA);
- `salt '*' state.apply chatmail` from the master for both relays (wall time) vs. one
  masterless `salt-call --local state.apply chatmail` of a Debian 12 Postfix relay, done
  last in the master's container (the same rootfs, mirrors and host; nsd and the salt
  master make way for it; `--no-masterless` skips it);
- idle memory per relay (RSS and PSS of every systemd service in the container).

Needs root; one lab per host (queue behind another with flock /run/chatmail-labq.lock).

Usage: flock /run/chatmail-labq.lock .venv/bin/python tests/bench/bench_fleet.py
       [--rounds 7] [--no-masterless]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from benchsupport import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tests" / "lab"))

import lab as labctl  # noqa: E402
import relayctl  # noqa: E402
from bench_relay import RSS_SCRIPT  # noqa: E402
from deltachat_rpc_client import DeltaChat  # noqa: E402
from fleetclient import online_account, start_lab_rpc  # noqa: E402
from relayclient import ROUND_PAUSE  # noqa: E402


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.0f} ms"


def wait_for_text(account, text: str) -> None:
    while account.wait_for_incoming_msg().get_snapshot().text != text:
        pass


def ping_pong(ac1, ac2, chat12, chat21, label: str) -> float:
    started = time.perf_counter()
    chat12.send_text(f"ping {label}")
    wait_for_text(ac2, f"ping {label}")
    chat21.send_text(f"pong {label}")
    wait_for_text(ac1, f"pong {label}")
    return time.perf_counter() - started


def pair_rounds(dc, first, second, rounds: int) -> list[float]:
    ac1, ac2 = online_account(dc, first), online_account(dc, second)
    chat12, chat21 = ac1.create_chat(ac2), ac2.create_chat(ac1)
    ping_pong(ac1, ac2, chat12, chat21, "warm-up")  # keys exchanged, connections up
    times = []
    for i in range(rounds):
        time.sleep(ROUND_PAUSE)  # below Delta Chat's own send rate limit
        times.append(ping_pong(ac1, ac2, chat12, chat21, str(i)))
    return times


def bench_ping_pong(lab: labctl.Lab, rounds: int) -> None:
    relay1, relay2 = lab.relays
    with tempfile.TemporaryDirectory() as accounts:
        rpc = start_lab_rpc(lab.add_client_netns(), Path(accounts))
        try:
            dc = DeltaChat(rpc)
            same = pair_rounds(dc, relay1, relay1, rounds)
            cross = pair_rounds(dc, relay1, relay2, rounds)
        finally:
            rpc.close()
    for label, values in (("same relay (relay1)", same), ("relay1 <-> relay2", cross)):
        print(
            f"Delta Chat ping-pong {label:20}: median {ms(median(values))} over {rounds} "
            f"(min {ms(min(values))}, max {ms(max(values))})"
        )
    print(f"cross-relay / same-relay ping-pong: ratio {median(cross) / median(same):.2f}")


def memory(host: relayctl.Relay) -> tuple[float, float]:
    """(RSS, PSS) in MiB over every service of the relay."""
    mem = json.loads(host.run(["python3", "-c", RSS_SCRIPT]).stdout)
    return sum(v[0] for v in mem.values()) / 1024, sum(v[1] for v in mem.values()) / 1024


def masterless_apply(lab: labctl.Lab) -> relayctl.ApplyResult:
    """`salt-call --local state.apply chatmail` of a `_`-domain Debian 12 Postfix relay in
    the master's container, its checkout where a masterless relay has it."""
    master = lab.master
    if master.suite != "bookworm":
        raise relayctl.RelayError(f"the master runs {master.suite}, the baseline is Debian 12")
    # nsd holds port 53 the relay's unbound needs; the fleet is done with both.
    master.run("systemctl stop nsd salt-master")
    master.run(["ln", "-sfn", labctl.MASTER_CHECKOUT, relayctl.REPO_MOUNT])
    solo = labctl.RelaySpec("solo", "_solo.lab.example", "bookworm", "postfix", "")
    master.configure_salt(labctl.relay_pillar(solo))
    return master.apply()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-masterless", action="store_true", help="skip the baseline apply")
    args = parser.parse_args()
    lab = labctl.Lab(labctl.default_relays()[:2])
    with relayctl.sigterm_as_interrupt():
        try:
            lab.create()
            print(f"lab boot ({len(lab.hosts)} hosts; nsd, salt keys): {lab.timings['boot']:.0f} s "
                  f"+ {lab.timings['master']:.0f} s")
            lab.write_pillar()
            first = lab.apply()
            fleet_seconds = max(r.seconds for r in first.values())
            if not all(r.ok for r in first.values()):
                raise relayctl.RelayError("\n".join(r.summary() for r in first.values()))
            second = lab.apply()
            print(
                f"fleet first apply from the master, {len(first)} relays: {fleet_seconds:6.1f} s"
            )
            print(
                "fleet second apply (nothing to do):           "
                f"{max(r.seconds for r in second.values()):6.1f} s"
            )
            for relay in lab.relays:
                for port in (25, 993, 443):
                    lab.relay(relay.minion_id).wait_for_port(port, host=relay.address)
            lab.fill_dns()
            bench_ping_pong(lab, args.rounds)
            time.sleep(5)  # let the services settle after the ping-pong
            for relay in lab.relays:
                rss, pss = memory(lab.relay(relay.minion_id))
                print(
                    f"idle memory {relay.minion_id} ({relay.suite}, {relay.mta}): "
                    f"RSS {rss:6.1f} MiB, PSS {pss:6.1f} MiB"
                )
            if not args.no_masterless:
                baseline = masterless_apply(lab)
                if not baseline.ok:
                    raise relayctl.RelayError(baseline.summary())
                print(
                    "masterless first apply, one relay (debian12-postfix): "
                    f"{baseline.seconds:6.1f} s"
                )
                print(
                    "fleet (2 relays from the master) / masterless (1 relay): "
                    f"ratio {fleet_seconds / baseline.seconds:.2f}"
                )
        finally:
            lab.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
