"""A real authoritative DNS server (NSD) on a loopback port, for tests.

Reusable by every test package (``tests/`` is on ``sys.path`` through the root conftest).
NSD is Debian's ``nsd`` package (in ``HOST_PACKAGES``); it runs in the foreground as a
child of the test, on ``127.0.0.1:<free port>``, with its config, zones and state in a
temporary directory, and is stopped when the ``with`` block (or the fixture) ends.

Usage::

    from dnsserver import DNSServer

    with DNSServer(tmp_path / "dns") as dns:
        dns.set_zone("example.org", [
            'sel._domainkey TXT "v=DKIM1; k=rsa; " "p=MIIB..."',
            "@ MX 10 mx.example.org.",
            "mx A 127.0.0.1",
        ])
        config = make_config(dns_resolver=dns.address)   # "127.0.0.1:PORT"
        ...
        dns.set_zone("example.org", [...])   # replace records; returns once served

Or through the ``dns_server`` fixture in ``tests/conftest.py``. Records are zone-file
lines relative to the zone origin; SOA and NS records are added. ``set_zone`` returns only
after the server answers with the new serial, so tests never race a reload.
``txt_strings(text)`` splits long TXT data (DKIM keys) into <= 255-byte strings.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

import dns.message
import dns.query
import dns.rdatatype

NSD = shutil.which("nsd") or "/usr/sbin/nsd"
START_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port that was free a moment ago (NSD cannot bind port 0 and report it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", port))  # must be free for UDP too
    return port


def txt_strings(text: str) -> str:
    """``text`` as quoted zone-file TXT strings of at most 255 bytes each."""
    chunks = [text[i : i + 255] for i in range(0, len(text), 255)] or [""]
    return " ".join(f'"{chunk}"' for chunk in chunks)


class DNSServer:
    host = "127.0.0.1"

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.zones: dict[str, int] = {}  # zone name -> serial
        self._process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        """``IP:PORT``, the form chatmail.ini's ``dns_resolver`` takes."""
        return f"{self.host}:{self.port}"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def set_zone(self, zone: str, records: list[str], ttl: int = 60) -> None:
        """Create or replace ``zone`` with ``records`` and wait until NSD serves it."""
        zone = zone.rstrip(".").lower()
        serial = self.zones.get(zone, 0) + 1
        lines = [
            f"$ORIGIN {zone}.",
            f"$TTL {ttl}",
            f"@ SOA ns.{zone}. hostmaster.{zone}. {serial} 3600 600 86400 {ttl}",
            f"@ NS ns.{zone}.",
            *records,
        ]
        path = self._zone_path(zone)
        path.write_text("\n".join(lines) + "\n")
        # NSD rereads a zone on SIGHUP only if its mtime changed: make sure it did.
        stamp = time.time() + serial
        os.utime(path, (stamp, stamp))
        new_zone = zone not in self.zones
        self.zones[zone] = serial
        if self._process is None or new_zone:
            self._restart()
        else:
            self._process.send_signal(signal.SIGHUP)
        self._wait_for_serial(zone, serial)

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    # -- internals ------------------------------------------------------------------

    def _zone_path(self, zone: str) -> Path:
        return self.directory / f"{zone}.zone"

    def _write_config(self) -> Path:
        d = self.directory
        zones = "".join(
            f'zone:\n    name: "{zone}"\n    zonefile: "{self._zone_path(zone)}"\n'
            for zone in self.zones
        )
        config = d / "nsd.conf"
        config.write_text(
            "server:\n"
            f"    ip-address: {self.host}@{self.port}\n"
            "    do-ip6: no\n"
            "    server-count: 1\n"
            '    username: ""\n'
            '    chroot: ""\n'
            '    database: ""\n'
            f'    zonesdir: "{d}"\n'
            f'    zonelistfile: "{d}/zone.list"\n'
            f'    xfrdfile: "{d}/xfrd.state"\n'
            f'    xfrdir: "{d}"\n'
            f'    pidfile: "{d}/nsd.pid"\n'
            f'    logfile: "{d}/nsd.log"\n'
            "    verbosity: 1\n"
            "remote-control:\n"
            "    control-enable: no\n" + zones
        )
        return config

    def _restart(self) -> None:
        self.stop()
        # Keep the port across restarts: resolvers in the test already point at it.
        for attempt in range(5):
            if not self.port or attempt:
                self.port = free_port()
            config = self._write_config()
            self._process = subprocess.Popen(
                [NSD, "-d", "-c", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_until_answering():
                return
            self.stop()
        log = self.directory / "nsd.log"
        detail = log.read_text() if log.exists() else "(no log)"
        raise RuntimeError(f"nsd did not start on {self.address}: {detail}")

    def _query_soa_serial(self, zone: str) -> int | None:
        query = dns.message.make_query(f"{zone}.", dns.rdatatype.SOA)
        try:
            response = dns.query.udp(query, self.host, port=self.port, timeout=0.5)
        except (OSError, dns.exception.DNSException):
            return None
        for rrset in response.answer:
            if rrset.rdtype == dns.rdatatype.SOA:
                return rrset[0].serial
        return None

    def _wait_until_answering(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        zone = next(iter(self.zones))
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False  # e.g. the port was taken in the meantime
            if self._query_soa_serial(zone) is not None:
                return True
            time.sleep(0.05)
        return False

    def _wait_for_serial(self, zone: str, serial: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._query_soa_serial(zone) == serial:
                return
            time.sleep(0.05)
        raise RuntimeError(f"nsd did not load serial {serial} of {zone}")
