"""What the applied relay exposes: listening ports, TLS on every TLS port, unit sandboxing.

The checks of the hardening issue's security list, run against the real relay of each
platform: a TLS scanner from Debian's archive (``sslscan``) against every TLS endpoint, the
container's own listening sockets, and ``systemd-analyze security`` for every unit the
formula ships.
"""

from __future__ import annotations

import re
import subprocess
import xml.etree.ElementTree as ET

import pytest
import relayctl
from relayclient import HOST

pytestmark = [pytest.mark.container, pytest.mark.timeout(1500)]

#: (port, sslscan's STARTTLS option or None for implicit TLS)
TLS_ENDPOINTS = [
    (25, "--starttls-smtp"),
    (587, "--starttls-smtp"),
    (465, None),
    (143, "--starttls-imap"),
    (993, None),
    (443, None),
]
#: coturn (salt/chatmail/turn) is public on purpose: STUN/TURN on 3478 (UDP and TCP) and
#: the relayed addresses, UDP in turn:min_port..max_port (defaults.yaml), held by turnserver.
TURN_PORT = 3478
TURN_RELAY_PORTS = range(49152, 65536)
#: sslscan's strength classes that a relay must not accept.
WEAK_STRENGTHS = {"null", "anonymous", "weak", "medium"}
#: systemd-analyze's exposure scale is 0 (locked down) to 10 (unprotected); 5.0 and above
#: is "MEDIUM". Every unit the formula ships must stay below that.
MAX_EXPOSURE = 5.0


def sslscan(port: int, starttls: str | None) -> ET.Element:
    # sslscan's default 3 s socket timeout counts a handshake that a loaded 2-core CI host
    # answers late as "protocol disabled" (seen once on OpenSMTPD's 465: every protocol off).
    cmd = ["sslscan", "--no-colour", "--xml=-", "--no-heartbleed", "--timeout=20"]
    if starttls:
        cmd.append(starttls)
    cmd.append(f"{HOST}:{port}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    return ET.fromstring(out[out.index("<?xml") :].encode())


@pytest.mark.parametrize(("port", "starttls"), TLS_ENDPOINTS, ids=[str(p) for p, _ in TLS_ENDPOINTS])
def test_tls_scan_only_tls12_and_strong_ciphers(relay, port, starttls):
    doc = sslscan(port, starttls)
    protocols = {
        f"{p.get('type')}{p.get('version')}": p.get("enabled") == "1"
        for p in doc.iter("protocol")
    }
    assert protocols, f"sslscan found no TLS on port {port}"
    enabled = sorted(name for name, on in protocols.items() if on)
    assert set(enabled) <= {"tls1.2", "tls1.3"} and enabled, f"port {port}: {enabled}"
    ciphers = [c.attrib for c in doc.iter("cipher")]
    assert ciphers, f"port {port}: no cipher accepted"
    weak = [
        f"{c['sslversion']} {c['cipher']} ({c.get('strength')}, {c.get('bits')} bits)"
        for c in ciphers
        if c.get("strength") in WEAK_STRENGTHS or int(c.get("bits", "0")) < 128
    ]
    assert not weak, f"port {port} accepts weak suites: {weak}"


#: Run inside the container (it has python3, not iproute2): every listening TCP socket and
#: bound UDP socket with the process that holds it, from /proc.
LISTENERS_SCRIPT = r"""
import os, socket
owners = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        comm = open(f"/proc/{pid}/comm").read().strip()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                owners[target[8:-1]] = comm
    except OSError:
        continue
for table, listening in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
    for line in open(f"/proc/net/{table}").read().splitlines()[1:]:
        fields = line.split()
        if fields[3] != listening or fields[9] not in owners:
            continue
        hexaddr, hexport = fields[1].split(":")
        raw = bytes.fromhex(hexaddr)
        if len(raw) == 4:
            address = socket.inet_ntop(socket.AF_INET, raw[::-1])
        else:
            address = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i+4][::-1] for i in range(0, 16, 4)))
        print(table, address, int(hexport, 16), owners[fields[9]])
"""


def _listening_sockets(container) -> list[tuple[str, str, int, str]]:
    """(protocol, address, port, process) of every socket a process *of the container* holds.

    The container shares the host's network namespace, so /proc/net lists the host's
    sockets too; only those held by a process in the container's PID namespace are its own.
    """
    out = container.run(["python3", "-"], input=LISTENERS_SCRIPT, check=True).stdout
    sockets = []
    for line in out.splitlines():
        protocol, address, port, process = line.split(maxsplit=3)
        sockets.append((protocol, address, int(port), process))
    return sockets


def test_only_the_public_ports_listen_beyond_loopback(applied):
    sockets = _listening_sockets(applied)
    assert any(port == 25 for _, _, port, _ in sockets), f"no relay socket found: {sockets}"
    public = {
        socket
        for socket in sockets
        if not (socket[1].startswith("127.") or socket[1] == "::1")
    }
    unexpected = sorted(
        (protocol, address, port, process)
        for protocol, address, port, process in public
        if port not in (*relayctl.PUBLIC_PORTS, TURN_PORT)
        and not (
            process == "turnserver" and protocol.startswith("udp") and port in TURN_RELAY_PORTS
        )
    )
    assert not unexpected, f"listening beyond loopback on non-public ports: {unexpected}"


def _shipped_units(container) -> list[str]:
    out = container.run(
        "grep -l '^# Managed by Salt (chatmail formula)' /etc/systemd/system/*.service",
        check=True,
    ).stdout
    return sorted(line.rsplit("/", 1)[1] for line in out.split())


def test_every_shipped_unit_is_sandboxed(applied):
    units = _shipped_units(applied)
    assert len(units) >= 5, units
    scores = {}
    for unit in units:
        out = applied.run(["systemd-analyze", "security", "--no-pager", unit], check=True).stdout
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
        assert match, f"{unit}: no exposure level in\n{out[-500:]}"
        scores[unit] = float(match.group(1))
    print("\nsystemd-analyze security: " + ", ".join(f"{u} {s}" for u, s in scores.items()))
    exposed = {u: s for u, s in scores.items() if s >= MAX_EXPOSURE}
    assert not exposed, f"units with exposure >= {MAX_EXPOSURE}: {exposed}"
