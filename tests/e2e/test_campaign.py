"""The load and fault campaign (campaign.py) in its reduced form: nothing accepted is lost.

100 IDLE sessions and 4 encrypted messages a second through submission, one fault per
phase (kill -9 of every chatmaild daemon and the API, Dovecot and MTA restarts, resolver and
OpenDKIM down, the whole container killed and booted again). The full run with 2,000 IDLE
sessions is ``tests/bench/bench_campaign.py``.
"""

from __future__ import annotations

import asyncio

import campaign
import pytest
from relayclient import encrypted_mail, message_id

pytestmark = [pytest.mark.container, pytest.mark.timeout(1500)]

IDLE_SESSIONS = 100
RATE = 4.0
SECONDS_PER_PHASE = 8.0


def test_nothing_accepted_is_lost_under_load_and_faults(relay):
    faults = campaign.standard_faults(relay)
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    reports, run = asyncio.run(
        campaign.run(relay, faults, SECONDS_PER_PHASE, IDLE_SESSIONS, RATE, log=log)
    )
    lines += [report.line() for report in reports]
    text = "\n".join(lines)
    # Kept beside the container's console log for the benchmark notes.
    (relay.container.log_path.parent / f"campaign-{relay.platform.id}.txt").write_text(text)
    print("\n" + text)

    assert f"{IDLE_SESSIONS} of {IDLE_SESSIONS} IDLE sessions up" in lines[0], text
    assert [r.name for r in reports] == ["no fault"] + [f.name for f in faults]
    baseline = reports[0]
    assert baseline.sent == int(SECONDS_PER_PHASE * RATE), text
    assert baseline.delivered == baseline.sent, f"without a fault everything arrives:\n{text}"
    for report in reports:
        assert report.sent == int(SECONDS_PER_PHASE * RATE), text
        assert report.lost == 0, f"{report.name}: accepted but never delivered\n{text}"
        assert report.refused_but_delivered == 0, text
        assert report.delivered + report.refused + report.deferred == report.sent, text
        # Every fault here is survivable: a retrying client gets all of its mail through.
        assert report.delivered == report.sent, f"{report.name}: not all delivered\n{text}"
    # The relay is whole again: a fresh account can still send and receive.
    alice, bob = relay.new_account(), relay.new_account()
    msgid = message_id(relay.domain)
    relay.send(587, *alice, [bob[0]], encrypted_mail(alice[0], [bob[0]], msgid))
    assert msgid.encode() in relay.fetch_inbox_message(*bob, msgid)
