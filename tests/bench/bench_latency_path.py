"""Benchmark: where a message's time goes between two clients on one relay (patched Dovecot).

One container relay, switched to our patched Dovecot as bench_dovecot.py does, then:
1. raw: a Python SMTP client submits (465, one logged-in connection, encrypted-looking
   mail) and a Python IMAP client in IDLE on the recipient waits for EXISTS: the relay
   alone, one direction.
2. Delta Chat ping-pong between two real profiles (deltachat-rpc-server) back to back, as
   bench_dovecot.py measured it before, counting the times a profile's SMTP loop slept for
   Delta Chat's own send rate limit (its "smtp got rate limited" log line);
3. the same with relayclient.ROUND_PAUSE between rounds (as the other benchmarks now do),
   so that the rate limit never applies.
Events are stamped when the RPC client receives them (--verbose prints the SMTP and IDLE
lines of Delta Chat's log with those times).

Usage: .venv/bin/python tests/bench/bench_latency_path.py [--rounds 9] [--platform ...]
"""

from __future__ import annotations

import argparse
import imaplib
import queue
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from statistics import median

from benchsupport import applied_relay, platform_argument
from bench_dovecot import apply_dovecot, installed_dovecot
import dovecotbuild
from relayclient import (
    HOST,
    PLATFORMS,
    ROUND_PAUSE,
    encrypted_mail,
    message_id,
    online_account,
    start_rpc,
    unverified_context,
)




def stamp(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")


def raw_rounds(relay, rounds: int) -> list[float]:
    """Seconds from the start of each SMTP submission until the recipient's IDLE sees EXISTS."""
    sender, spass = relay.new_account()
    rcpt, rpass = relay.new_account()
    imap = imaplib.IMAP4_SSL(HOST, 993, ssl_context=unverified_context(), timeout=30)
    imap.login(rcpt, rpass)
    imap.select("INBOX")
    smtp = relay.smtp(465, sender, spass)
    times = []
    for i in range(rounds):
        imap.send(b"a1 IDLE\r\n")
        assert imap.readline().startswith(b"+")
        started = time.time()
        smtp.sendmail(sender, [rcpt], encrypted_mail(sender, [rcpt], message_id(relay.domain)))
        accepted = time.time()
        while b"EXISTS" not in imap.readline():
            pass
        seen = time.time()
        times.append(seen - started)
        print(
            f"raw {i}: submit {stamp(started)} 250 {stamp(accepted)} "
            f"EXISTS {stamp(seen)}  total {seen - started:.3f} s (submit {accepted - started:.3f})"
        )
        imap.send(b"DONE\r\n")
        while not imap.readline().startswith(b"a1 "):
            pass
        time.sleep(0.3)
    smtp.quit()
    imap.logout()
    return times


class StampedQueue(queue.Queue):
    """Each event gets the wall-clock time the RPC client received it."""

    def put(self, item, *args, **kwargs):
        if isinstance(item, dict):
            item = {**item, "t": time.time()}
        super().put(item, *args, **kwargs)


def wait_incoming(account, log: list) -> float:
    """Time of the account's next IncomingMsg; every event consumed meanwhile goes to log."""
    while True:
        event = account.wait_for_event()
        log.append((event.t, account.id, event.kind, event.get("msg", "")))
        if event.kind == "IncomingMsg":
            return event.t


def first_after(log: list, account_id: int, text: str, after: float) -> float:
    return min(t for t, acc, _, msg in log if acc == account_id and text in msg and t > after)


def split(log: list, sender: int, receiver: int, started: float, got: float) -> tuple:
    """(client send, relay, client receive) seconds of one direction: send_text until the
    sender's SMTP transaction ended, until the receiver's IDLE saw EXISTS, until its
    IncomingMsg."""
    sent = first_after(log, sender, "was SMTP-sent", started)
    exists = first_after(log, receiver, "Idle has NewData", sent)
    if exists > got:  # the receiver was not in IDLE: its next fetch found the message
        return sent - started, None, None
    return sent - started, exists - sent, got - exists


def seconds(parts: tuple) -> str:
    return " ".join("-" if x is None else f"{x:.3f}" for x in parts)


def dc_rounds(relay, rounds: int, pause: float, verbose: bool) -> tuple[list, list, int]:
    """Ping-pong seconds (after a warm-up round) with ``pause`` between rounds, each
    direction split (client send, relay, client receive), and how often a profile's SMTP
    loop slept for Delta Chat's send rate limit."""
    from deltachat_rpc_client import DeltaChat

    times, directions, log = [], [], []
    with tempfile.TemporaryDirectory() as accounts:
        rpc = start_rpc(Path(accounts) / "dc")
        try:
            rpc.get_queue = lambda account_id: rpc.event_queues.setdefault(
                account_id, StampedQueue()
            )
            dc = DeltaChat(rpc)
            ac1, ac2 = online_account(dc, relay), online_account(dc, relay)
            chat21, chat12 = ac2.create_chat(ac1), ac1.create_chat(ac2)
            timed = []
            for i in range(rounds + 1):  # the first is the warm-up
                started = time.time()
                chat12.send_text(f"ping {i}")
                got_ping = wait_incoming(ac2, log)
                pong = time.time()
                chat21.send_text(f"pong {i}")
                got_pong = wait_incoming(ac1, log)
                if i:
                    times.append(got_pong - started)
                    timed.append((started, got_ping, pong, got_pong))
                time.sleep(pause)
            time.sleep(1)  # the last events of the sending side
            for account in (ac1, ac2):
                while not (queue_ := rpc.get_queue(account.id)).empty():
                    event = queue_.get_nowait()
                    log.append((event["t"], account.id, event["kind"], event.get("msg", "")))
        finally:
            rpc.close()
    for i, (started, got_ping, pong, got_pong) in enumerate(timed, 1):
        ping_split = split(log, ac1.id, ac2.id, started, got_ping)
        pong_split = split(log, ac2.id, ac1.id, pong, got_pong)
        directions += [ping_split, pong_split]
        print(
            f"dc pause {pause} s, round {i}: {got_pong - started:.3f} s; (send, relay, receive)"
            f" ping {seconds(ping_split)}, pong {seconds(pong_split)}"
        )
    limited = sum(
        "smtp got rate limited" in msg for t, _, _, msg in log if t > timed[0][0]
    )
    if verbose:
        for t, acc, kind, msg in sorted(log):
            if kind == "IncomingMsg" or "smtp" in msg.lower() or "Idle has" in msg:
                print(f"    {stamp(t)} ac{acc} {kind} {msg[:120]}")
    return times, directions, limited


def summary(name: str, times: list[float]) -> str:
    return (
        f"{name}: median {median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f}, "
        f"{len(times)} rounds)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--verbose", action="store_true", help="Delta Chat's SMTP/IDLE log lines")
    platform_argument(parser)
    args = parser.parse_args()
    suite = {p.id: p.suite for p in PLATFORMS}[args.platform]
    repo = dovecotbuild.ensure_built(suite)
    with applied_relay(args.platform) as (relay, _):
        container = relay.container
        container.provide_dovecot_packages(repo)
        apply_dovecot(container, relay.platform, "patched")
        print(f"platform {args.platform}, dovecot-core {installed_dovecot(container)}")
        raw = raw_rounds(relay, args.rounds)
        # back to back, as bench_dovecot.py; then each profile sending at most once a second
        tight = dc_rounds(relay, args.rounds, 0.0, args.verbose)
        paced = dc_rounds(relay, args.rounds, ROUND_PAUSE, args.verbose)
        print(summary("raw SMTP submit -> IMAP IDLE EXISTS (one direction)", raw))
        for name, (times, directions, limited) in (
            ("back to back", tight),
            (f"{ROUND_PAUSE} s apart", paced),
        ):
            print(f"{summary(f'Delta Chat ping-pong {name}', times)}, rate-limit sleeps {limited}")
            parts = [median(d[k] for d in directions if d[k] is not None) for k in range(3)]
            print(
                "    per direction, medians: client send {:.3f} s, relay {:.3f} s, "
                "client receive {:.3f} s".format(*parts)
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
