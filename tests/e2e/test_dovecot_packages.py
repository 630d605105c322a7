"""chatmail:dovecot:packages on a real relay: switch the session's relay to our patched
Dovecot build (scripts/build-dovecot; the test run starts it in the background, see
tests/conftest.py), check that it runs and Delta Chat works, then switch back to Debian's.

The build is cached per machine (/var/cache/chatmail-test/dovecot-debs): on a new machine
the first test here waits for it (2 cores: see packaging/dovecot/README.md).
"""

from __future__ import annotations

import json

import dovecotbuild
import httpx
import pytest
import relayctl
from deltachat_rpc_client import DeltaChat
from relayclient import online_account, ping_pong, start_rpc

pytestmark = [
    pytest.mark.container,
    pytest.mark.timeout(3600),
    # Dovecot and its packages do not depend on the MTA: debian13-postfix covers trixie.
    pytest.mark.on_platforms("debian12-postfix", "debian13-postfix"),
]

API_PORT = 8077
TOKENS_FILE = "/etc/chatmail/api-tokens.json"


def apply_with(relay, relay_pillar, packages: str) -> relayctl.ApplyResult:
    pillar = relay_pillar()
    pillar["chatmail"]["dovecot"] = {"packages": packages}
    relay.container.configure_salt(pillar)
    result = relay.container.apply()
    assert result.ok, result.summary()
    relay.container.wait_for_services()
    return result


def installed(relay) -> str:
    res = relay.container.run(["dpkg-query", "-W", "-f=${Version}", "dovecot-core"])
    return res.stdout.strip()


def running_binary(relay) -> str:
    """The executable of Dovecot's master process ("... (deleted)" after an upgrade
    without a restart)."""
    return relay.container.run(
        "readlink /proc/$(systemctl show -p MainPID --value dovecot.service)/exe"
    ).stdout.strip()


def dovecot_check(relay) -> dict:
    tokens = json.loads(relay.container.read_file(TOKENS_FILE))
    ((_, monitor),) = tokens["monitor"].items()
    with httpx.Client(base_url=f"http://127.0.0.1:{API_PORT}", timeout=60) as client:
        # /status is cached for a few seconds; the API restarted with its new settings
        relay.container.wait_for_port(API_PORT, timeout=60)
        resp = client.get("/status", headers={"Authorization": f"Bearer {monitor}"})
    assert resp.status_code == 200, resp.text
    return {c["id"]: c for c in resp.json()["checks"]}["dovecot.build"]


@pytest.fixture(scope="module")
def patched_relay(relay, relay_pillar, platform):
    """The session's relay switched to the patched build (the last test switches back)."""
    stock = installed(relay)
    assert "+chatmail" not in stock
    relay.container.provide_dovecot_packages(dovecotbuild.ensure_built(platform.suite))
    relay.first_patched_apply = apply_with(relay, relay_pillar, "patched")
    relay.stock_version = stock
    return relay


def test_patched_build_is_installed_and_runs(patched_relay):
    relay = patched_relay
    changed = {v["__id__"] for v in relay.first_patched_apply.changed.values()}
    assert {"chatmail-dovecot-packages", "chatmail-dovecot-packages-pin"} <= changed
    version = installed(relay)
    pinned = dovecotbuild.pinned_sources()[relay.platform.suite][0]
    # Debian 13's archive may be newer than the pinned source: the pin downgrades then
    assert version == pinned + dovecotbuild.VERSION_SUFFIX, (version, relay.stock_version)
    assert running_binary(relay) == "/usr/sbin/dovecot"
    check = dovecot_check(relay)
    assert check["state"] == "ok" and "our build" in check["summary"], check


def test_patched_apply_is_idempotent(patched_relay, relay_pillar):
    second = apply_with(patched_relay, relay_pillar, "patched")
    assert second.changed == {}, second.changed_summary()


def test_delta_chat_over_the_patched_build(patched_relay, tmp_path):
    rpc = start_rpc(tmp_path / "accounts")
    try:
        dc = DeltaChat(rpc)
        ac1, ac2 = online_account(dc, patched_relay), online_account(dc, patched_relay)
        chat21, chat12 = ac2.create_chat(ac1), ac1.create_chat(ac2)
        chat12.send_text("hello over the patched Dovecot")
        msg = ac2.wait_for_incoming_msg().get_snapshot()
        assert msg.text == "hello over the patched Dovecot" and msg.show_padlock
        seconds = ping_pong(ac1, ac2, chat12, chat21, "patched")
        print(f"\nDelta Chat ping-pong over the patched Dovecot: {seconds * 1000:.0f} ms")
    finally:
        rpc.close()


def test_back_to_debian(patched_relay, relay_pillar):
    """Last here: the session's other tests run on Debian's Dovecot again."""
    result = apply_with(patched_relay, relay_pillar, "debian")
    changed = {v["__id__"] for v in result.changed.values()}
    assert {"chatmail-dovecot-packages", "chatmail-dovecot-packages-list"} <= changed
    assert installed(patched_relay) == patched_relay.stock_version
    assert running_binary(patched_relay) == "/usr/sbin/dovecot"
    assert dovecot_check(patched_relay)["state"] == "ok"
