"""Calls through the relay's own TURN server, from IMAP METADATA to a relayed address.

What a Delta Chat app does: log in over IMAP, ask ``GETMETADATA "" /shared/vendor/deltachat/
turn``, parse ``host:port:expiry:password`` (core's ``create_ice_servers_from_metadata``)
and allocate a relay with those credentials. The TURN client is aioice's (the ICE stack
of aiortc), talking to the real coturn of the applied container over UDP and TCP.
Wrong and expired credentials must be refused, and no allocation may reach loopback or
private peers.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import socket
import time

import httpx
import pytest
from aioice import stun, turn

pytestmark = [pytest.mark.container, pytest.mark.timeout(1500)]

TURN_KEY = "/shared/vendor/deltachat/turn"
PORT = 3478
RELAY_PORTS = range(49152, 65536)  # salt/chatmail/parameters/defaults.yaml turn:min/max_port
FIVE_DAYS = 5 * 86400
DENIED_PEERS = [
    "127.0.0.1",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
]
PUBLIC_PEER = "9.9.9.9"


def host_address() -> str:
    """The host's own outward address (not loopback): the container shares its network."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route
        return probe.getsockname()[0]


def turn_metadata(relay) -> str:
    addr, password = relay.new_account()
    with relay.imap(addr, password) as conn:
        typ, data = conn.xatom("GETMETADATA", '""', TURN_KEY)
        assert typ == "OK", data
        metadata = conn.untagged_responses.pop("METADATA", [])
    for item in metadata:
        raw = item[1] if isinstance(item, tuple) else item
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        match = re.search(r'(\S+:\d+:\d+:[A-Za-z0-9+/=]+)"?\)?\s*$', text)
        if match:
            return match.group(1)
    raise AssertionError(f"no TURN credentials in the METADATA answer: {metadata!r}")


def parse_turn(line: str) -> tuple[str, int, str, str]:
    """host, port, username, password: core's split (the username is the expiry)."""
    host, port, username, password = line.split(":", 3)
    int(username)  # Delta Chat rejects a username that is not a timestamp
    return host, int(port), username, password


def rest_password(secret: str, username: str) -> str:
    return base64.b64encode(
        hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    ).decode()


async def allocate(server: tuple[str, int], username: str, password: str, transport: str = "udp"):
    """Allocate a relay; returns the client protocol (already connected)."""
    loop = asyncio.get_running_loop()
    kwargs = {
        "username": username,
        "password": password,
        "lifetime": 600,
        "channel_refresh_time": 500,
    }
    if transport == "tcp":
        inner, protocol = await loop.create_connection(
            lambda: turn.TurnClientTcpProtocol(server, **kwargs), host=server[0], port=server[1]
        )
    else:
        inner, protocol = await loop.create_datagram_endpoint(
            lambda: turn.TurnClientUdpProtocol(server, **kwargs), remote_addr=server
        )
    try:
        await asyncio.wait_for(protocol.connect(), 20)
    except BaseException:
        inner.close()
        raise
    return inner, protocol


async def permission(protocol, peer: str) -> int:
    """CreatePermission for ``peer``: 200 or the server's error code."""
    request = stun.Message(
        message_method=stun.Method.CREATE_PERMISSION, message_class=stun.Class.REQUEST
    )
    request.attributes["XOR-PEER-ADDRESS"] = (peer, 0)
    try:
        await protocol.request_with_retry(request)
    except stun.TransactionFailed as exc:
        return exc.response.error_code
    return 200


@pytest.fixture(scope="module")
def turn_server(applied) -> tuple[str, int]:
    applied.wait_for_port(PORT, timeout=60)
    return host_address(), PORT


@pytest.fixture(scope="module")
def secret(applied) -> str:
    return applied.run(["cat", "/etc/chatmail/turn-secret"], check=True).stdout.strip()


def test_metadata_answers_upstreams_turn_line(relay):
    before = time.time()
    host, port, username, password = parse_turn(turn_metadata(relay))
    assert (host, port) == (relay.domain, PORT)
    assert before + FIVE_DAYS - 60 < int(username) < time.time() + FIVE_DAYS + 60
    assert len(base64.b64decode(password)) == 20  # an HMAC-SHA1


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_metadata_credentials_allocate_a_relay(relay, turn_server, transport):
    _, _, username, password = parse_turn(turn_metadata(relay))

    async def scenario():
        inner, protocol = await allocate(turn_server, username, password, transport)
        try:
            return protocol.relayed_address, protocol.mapped_address
        finally:
            await protocol.delete()
            inner.close()

    relayed, mapped = asyncio.run(scenario())
    assert relayed[1] in RELAY_PORTS, relayed
    assert mapped[0] == turn_server[0], mapped


@pytest.mark.parametrize(
    "credentials",
    ["wrong-password", "expired", "other-secret", "not-a-timestamp"],
)
def test_bad_credentials_are_refused(relay, turn_server, secret, credentials):
    _, _, username, password = parse_turn(turn_metadata(relay))
    if credentials == "wrong-password":
        password = rest_password(secret, str(int(username) + 1))
    elif credentials == "expired":
        username = str(int(time.time()) - 60)
        password = rest_password(secret, username)  # rightly signed, but over
    elif credentials == "other-secret":
        password = rest_password("0" * 64, username)
    else:
        username = "alice"
        password = rest_password(secret, username)

    async def scenario():
        with pytest.raises(stun.TransactionFailed) as failed:
            await allocate(turn_server, username, password)
        return failed.value.response.error_code

    assert asyncio.run(scenario()) == 401


def test_no_relaying_to_loopback_or_private_peers(relay, turn_server):
    _, _, username, password = parse_turn(turn_metadata(relay))

    async def scenario():
        inner, protocol = await allocate(turn_server, username, password)
        try:
            codes = {peer: await permission(protocol, peer) for peer in DENIED_PEERS}
            codes[PUBLIC_PEER] = await permission(protocol, PUBLIC_PEER)
            return codes
        finally:
            await protocol.delete()
            inner.close()

    codes = asyncio.run(scenario())
    assert codes == {**dict.fromkeys(DENIED_PEERS, 403), PUBLIC_PEER: 200}


def test_coturn_reads_its_whole_config(applied, turn_server):
    """coturn has no validator and skips lines it does not know: its log must show none,
    and every option in the rendered config must be one turnserver lists itself."""
    log = applied.run("journalctl -u coturn -b --no-pager -o cat", check=True).stdout
    assert "Bad configuration format" not in log
    assert "CONFIG ERROR" not in log and "CONFIGURATION ALERT" not in log, log[-2000:]
    usage = applied.run("turnserver --help 2>&1 || true", check=True).stdout
    known = set(re.findall(r"--([a-z0-9][a-z0-9_-]*)", usage))
    config = applied.run(["cat", "/etc/chatmail/turnserver.conf"], check=True).stdout
    options = {
        line.split("=", 1)[0] for line in config.splitlines() if line and not line.startswith("#")
    }
    assert options and options <= known, options - known


def test_secret_and_socket_are_least_privilege(applied):
    mode = applied.run(["stat", "-c", "%U:%G %a", "/etc/chatmail/turn-secret"], check=True).stdout
    assert mode.split() == ["root:root", "600"]
    socket_mode = applied.run(
        ["stat", "-c", "%U:%G %a %F", "/run/chatmail-turn/turn.socket"], check=True
    ).stdout
    assert socket_mode.split()[:2] == ["root:vmail", "660"] and "socket" in socket_mode
    # the running coturn got the secret through its runtime directory, nobody else can read it
    runtime = applied.run(["stat", "-c", "%U %a", "/run/coturn"], check=True).stdout.split()
    assert runtime == ["turnserver", "700"]


def test_turn_units_are_sandboxed(applied):
    for unit in ("coturn.service", "chatmail-turn-credentials.service"):
        out = applied.run(["systemd-analyze", "security", "--no-pager", unit], check=True).stdout
        score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))
        print(f"\nsystemd-analyze security {unit}: {score}")
        assert score < 5.0, out[-1500:]


def test_status_checks_turn(applied):
    """/status: coturn answers STUN, and its units run; a stopped coturn is reported."""
    applied.wait_for_port(8077, timeout=60)
    tokens = json.loads(applied.read_file("/etc/chatmail/api-tokens.json"))
    ((_, monitor),) = tokens["monitor"].items()
    headers = {"Authorization": f"Bearer {monitor}"}

    def turn_checks(expect: str) -> dict:
        deadline = time.monotonic() + 30  # /status is cached for a few seconds
        while True:
            status = httpx.get("http://127.0.0.1:8077/status", headers=headers, timeout=30).json()
            checks = {c["id"]: c for c in status["checks"]}
            if checks["turn.stun"]["state"] == expect or time.monotonic() > deadline:
                return checks
            time.sleep(1)

    checks = turn_checks("ok")
    for cid in ("turn.stun", "service.coturn", "service.chatmail-turn-credentials.socket"):
        assert checks[cid]["state"] == "ok", checks[cid]
    applied.run(["systemctl", "stop", "coturn"], check=True)
    try:
        stopped = turn_checks("fail")
    finally:
        applied.run(["systemctl", "start", "coturn"], check=True)
    assert stopped["turn.stun"]["state"] == "fail", stopped["turn.stun"]
    assert stopped["turn.stun"]["severity"] == "warning"
    assert stopped["service.coturn"]["state"] == "fail"


def test_reapply_keeps_the_secret_and_changes_nothing(applied, relay, turn_server, secret):
    """The secret is generated once: a second apply neither replaces it nor restarts
    anything, and logins signed before it still allocate."""
    _, _, username, password = parse_turn(turn_metadata(relay))
    result = applied.apply()
    assert result.ok, result.summary()
    assert not result.changed, result.changed_summary()
    assert applied.run(["cat", "/etc/chatmail/turn-secret"], check=True).stdout.strip() == secret

    async def scenario():
        inner, protocol = await allocate(turn_server, username, password)
        await protocol.delete()
        inner.close()
        return protocol.relayed_address

    assert asyncio.run(scenario())[1] in RELAY_PORTS
