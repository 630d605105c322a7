"""A lab of hosts for fleet tests: a salt master and relay minions on a bridge of their own.

Each host is a systemd-nspawn container (relayctl's base rootfs) in its own network
namespace, with a veth into the bridge ``cmlab0`` and a static address from
198.18.0.0/15 (RFC 2544's benchmarking range, so nothing real is ever addressed). The
host is 198.18.0.1 and routes for the lab only this much: TCP 80/443 to the package
mirrors' addresses (resolved once on the host and pinned in every host's /etc/hosts),
masqueraded. Everything else from the lab to the outside is dropped, and the lab cannot
reach the host's own services. The lab hosts resolve through the lab DNS (nsd on the
master), which knows nothing but the relays' zones.

The salt master runs the same Salt as the minions (the base rootfs's venv), with
``file_roots`` as README.md documents, the repository (a snapshot) at
/srv/chatmail-relay and one pillar file per relay; the minions' keys are preseeded. A lab
CA (the host's openssl) certifies every relay with an ordinary name (``tls: external``);
every host trusts it, so relay-to-relay TLS is verified as on the internet, while ``_``
domains stay self-signed (encryption without verification, upstream's rule).

Everything the lab creates is recorded in ``STATE_DIR/lab.json`` before it is created;
``Lab.destroy`` removes it (containers, bridge, nftables table, the ip_forward value), and
the next lab removes what a killed one left behind. One lab at a time per host
(``LOCK_PATH``).

CLI (for a look by hand): ``python3 scripts/lib/lab.py up [--no-apply]|destroy``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import relayctl  # noqa: E402
from relayctl import RelayError, log  # noqa: E402

LAB_RANGE = ipaddress.ip_network("198.18.0.0/15")
LAB_SUBNET = ipaddress.ip_network("198.18.0.0/24")
HOST_ADDRESS = "198.18.0.1"
BRIDGE = "cmlab0"
NFT_TABLE = "chatmail_lab"
STATE_DIR = Path("/var/tmp/chatmail-lab")
STATE_FILE = STATE_DIR / "lab.json"
LOCK_PATH = Path("/run/chatmail-lab.lock")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
#: The only outside names lab hosts resolve (through /etc/hosts): apt's and pip's.
MIRROR_NAMES = ("deb.debian.org", "pypi.org", "files.pythonhosted.org")
MIRROR_PORTS = (80, 443)

MASTER_ADDRESS = "198.18.0.2"
#: The lab's DNS server (nsd) runs on the master.
DNS_ADDRESS = MASTER_ADDRESS
#: Where the master finds the repository: the path README.md's master section names.
MASTER_CHECKOUT = "/srv/chatmail-relay"
MASTER_CONFIG = {
    "file_roots": {"base": [f"{MASTER_CHECKOUT}/salt", MASTER_CHECKOUT]},
    "file_ignore_regex": [
        r"(^|/)\.venv(/|$)",
        r"(^|/)\.git(/|$)",
        r"(^|/)__pycache__(/|$)",
        r"\.egg-info(/|$)",
    ],
}
PILLAR_ROOT = "/srv/pillar"
NSD_ZONES = "/etc/nsd/lab-zones"
#: The lab CA's certificate in every host's trust store (update-ca-certificates).
CA_TRUST_PATH = "usr/local/share/ca-certificates/chatmail-lab-ca.crt"
#: A relay's lab-CA certificate and key (pillar tls:cert, tls:key).
RELAY_CERT = "/etc/chatmail-lab/tls/cert.pem"
RELAY_KEY = "/etc/chatmail-lab/tls/key.pem"
#: Reverse DNS for the lab subnet (the relays' PTR records).
REVERSE_ZONE = "0.18.198.in-addr.arpa"
#: A network namespace on the bridge for clients in the lab (Delta Chat): an address of
#: its own, the lab DNS (ip-netns(8) bind-mounts /etc/netns/<name>/resolv.conf) and no
#: route out of the lab.
CLIENT_NETNS = "cmlab-client"
CLIENT_ADDRESS = "198.18.0.30"
CLIENT_VETH = "cmlab-client0"
#: Salt's CLI gives up on a minion after this long without a return; a first apply
#: installs packages for minutes. (Salt 3008's --static and -b give up after 15 s.)
SALT_TIMEOUT = 1800


@dataclass
class RelaySpec:
    """One relay minion: its minion id, domain, Debian release and MTA.

    An ordinary domain gets a certificate from the lab CA (``tls: external``), which
    every lab host trusts, so other relays verify it; a ``_`` domain stays self-signed.
    An IP-address relay (``domain`` its IPv4 address) has addresses ``user@[IP]``, no zone
    in the lab DNS and a self-signed certificate for the address.
    """

    minion_id: str
    domain: str
    suite: str
    mta: str
    address: str

    @property
    def ip_relay(self) -> bool:
        try:
            ipaddress.IPv4Address(self.domain)
        except ValueError:
            return False
        return True

    @property
    def address_domain(self) -> str:
        """The part after ``@`` in the relay's addresses."""
        return f"[{self.domain}]" if self.ip_relay else self.domain

    @property
    def lab_ca_cert(self) -> bool:
        return not (self.domain.startswith("_") or self.ip_relay)


@dataclass
class ZoneFill:
    """What ``Lab.fill_dns`` served for one relay."""

    domain: str
    api_zone: str
    zone_file: str


@dataclass
class Lab:
    relays: list[RelaySpec]
    repo: Path = relayctl.REPO_ROOT
    master_suite: str = relayctl.DEFAULT_SUITE
    hosts: dict[str, relayctl.Relay] = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    minion_keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    ca: LabCA | None = None
    _lock: object = None

    # --- state file: what exists, so a later run can remove it ---------------------

    def _save_state(self) -> None:
        partial = STATE_FILE.with_suffix(".partial")
        partial.write_text(json.dumps(self.state, indent=2))
        partial.rename(STATE_FILE)

    def _record(self, **items) -> None:
        self.state.update(items)
        self._save_state()

    # --- lifecycle -----------------------------------------------------------------

    def create(self) -> None:
        """Bridge, NAT, master and relays booted, salt keys accepted (nothing applied)."""
        require_host()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self._lock = open(LOCK_PATH, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RelayError(f"another lab runs on this host (lock {LOCK_PATH})") from None
        remove_stale_lab()
        self.state = {"owner": os.getpid(), "hosts": {}}
        self._save_state()
        started = time.monotonic()
        mirrors = resolve_mirrors()
        self._network_up(mirrors)
        source = STATE_DIR / "src"
        self._record(source=str(source))
        relayctl.snapshot_repo(self.repo, source)
        specs = [("master", MASTER_ADDRESS, self.master_suite)] + [
            (r.minion_id, r.address, r.suite) for r in self.relays
        ]
        for suite in {suite for _, _, suite in specs}:
            relayctl.ensure_rootfs(suite)  # built once, before the parallel unpacks
        for name, address, suite in specs:
            root = STATE_DIR / name
            self.hosts[name] = relayctl.Relay(
                root,
                name=f"cmlab-{name}",
                repo=source,
                pidfile=STATE_DIR / f"{name}.pid",
                suite=suite,
                network_bridge=BRIDGE,
                # only the master has the checkout: minions get the formula from it
                repo_mount=MASTER_CHECKOUT if name == "master" else "",
                # hosts of one release install packages at the same time (and e2e's too)
                shared_apt_cache=False,
            )
            self.state["hosts"][name] = str(root)
        self._save_state()
        # Preseeded keys (Salt's documented way): the master accepts exactly these.
        self.minion_keys = {r.minion_id: generate_keypair() for r in self.relays}
        ca_dir = STATE_DIR / "ca"
        self._record(ca_dir=str(ca_dir))
        self.ca = LabCA(ca_dir)
        with concurrent.futures.ThreadPoolExecutor(len(specs)) as pool:
            list(
                pool.map(
                    lambda spec: self._boot_host(*spec, mirrors=mirrors),
                    specs,
                )
            )
        self.timings["boot"] = time.monotonic() - started
        log(f"lab booted: {len(specs)} hosts in {self.timings['boot']:.0f} s")
        started = time.monotonic()
        self._setup_dns()
        self._check_minions()
        self.timings["master"] = time.monotonic() - started

    @classmethod
    def attach(cls, relays: list[RelaySpec]) -> Lab:
        """The lab ``lab.py up`` keeps running, for tests against it (the tests' conftest:
        CHATMAIL_LAB_REUSE=1); it stays when they end."""
        state = json.loads(STATE_FILE.read_text())
        lab = cls(relays, state=state)
        for name, root in state["hosts"].items():
            pidfile = Path(f"{root}.pid")
            host = relayctl.Relay(
                Path(root),
                name=f"cmlab-{name}",
                pidfile=pidfile,
                network_bridge=BRIDGE,
                repo_mount=MASTER_CHECKOUT if name == "master" else "",
                shared_apt_cache=False,
            )
            if relayctl.is_nspawn(nspawn_pid := int(pidfile.read_text().split()[0])):
                host.attach(nspawn_pid)
            lab.hosts[name] = host
        lab.ca = LabCA(Path(state["ca_dir"]), create=False)
        return lab

    def destroy(self) -> None:
        with concurrent.futures.ThreadPoolExecutor(max(1, len(self.hosts))) as pool:
            for failure in pool.map(_destroy_quietly, self.hosts.values()):
                if failure:
                    log(f"removing a lab host failed (retried below): {failure}")
        self.hosts.clear()
        if self.state:
            teardown(self.state)
            self.state = {}
        if self._lock:
            self._lock.close()
            self._lock = None

    # --- network -------------------------------------------------------------------

    def _network_up(self, mirrors: dict[str, str]) -> None:
        before = IP_FORWARD.read_text().strip()
        self._record(bridge=BRIDGE, nft_table=NFT_TABLE, ip_forward_before=before)
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "addr", "add", f"{HOST_ADDRESS}/{LAB_SUBNET.prefixlen}", "dev", BRIDGE])
        run(["ip", "link", "set", BRIDGE, "up"])
        run(["nft", "-f", "-"], input=nft_ruleset(mirrors, routing_was_off=before == "0"))
        IP_FORWARD.write_text("1\n")

    def add_client_netns(self) -> list[str]:
        """The command prefix that runs a program in the lab's client namespace."""
        etc = Path("/etc/netns") / CLIENT_NETNS
        prefix = ["ip", "netns", "exec", CLIENT_NETNS]
        # (a reused lab's state file may still name a namespace an earlier run removed)
        if self.state.get("netns") and Path("/run/netns", CLIENT_NETNS).exists():
            return prefix
        self._record(netns=CLIENT_NETNS, netns_etc=str(etc))
        run(["ip", "netns", "add", CLIENT_NETNS])
        run(["ip", "link", "add", CLIENT_VETH, "type", "veth", "peer", "name", "host0"]
            + ["netns", CLIENT_NETNS])
        run(["ip", "link", "set", CLIENT_VETH, "master", BRIDGE, "up"])
        inside = ["ip", "-n", CLIENT_NETNS]
        run(inside + ["addr", "add", f"{CLIENT_ADDRESS}/{LAB_SUBNET.prefixlen}", "dev", "host0"])
        run(inside + ["link", "set", "host0", "up"])
        run(inside + ["link", "set", "lo", "up"])
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {DNS_ADDRESS}\n")
        return prefix

    # --- hosts ---------------------------------------------------------------------

    def _boot_host(self, name: str, address: str, suite: str, mirrors: dict[str, str]) -> None:
        host = self.hosts[name]
        host.unpack()
        prepare_rootfs(host.root, name, address, self.host_entries(), mirrors)
        write_file(host.root, "/" + CA_TRUST_PATH, self.ca.cert.read_bytes())
        if name == "master":
            self._prepare_master(host.root)
        else:
            self._prepare_minion(host.root, next(r for r in self.relays if r.minion_id == name))
        host.boot()
        host.run(["update-ca-certificates"])

    def _prepare_master(self, root: Path) -> None:
        write_unit(root, "salt-master", "/opt/salt/bin/salt-master")
        write_file(
            root, "/etc/salt/master.d/chatmail.conf", json.dumps(MASTER_CONFIG, indent=2) + "\n"
        )
        for tool in ("salt", "salt-key", "salt-run"):
            link = root / "usr/local/bin" / tool
            link.unlink(missing_ok=True)
            link.symlink_to(f"{relayctl.SALT_VENV}/bin/{tool}")
        for relay in self.relays:
            public = self.minion_keys[relay.minion_id][1]
            write_file(root, f"/etc/salt/pki/master/minions/{relay.minion_id}", public)

    def _prepare_minion(self, root: Path, relay: RelaySpec) -> None:
        private, public = self.minion_keys[relay.minion_id]
        write_file(root, "/etc/salt/pki/minion/minion.pub", public)
        write_file(root, "/etc/salt/pki/minion/minion.pem", private, mode=0o400)
        minion = {"master": MASTER_ADDRESS, "id": relay.minion_id, "acceptance_wait_time": 2}
        write_file(root, "/etc/salt/minion.d/lab.conf", json.dumps(minion, indent=2) + "\n")
        write_unit(root, "salt-minion", "/opt/salt/bin/salt-minion")
        if relay.lab_ca_cert:
            cert, key = self.ca.issue(relay.domain)
            write_file(root, RELAY_CERT, cert)
            write_file(root, RELAY_KEY, key, mode=0o600)

    def host_entries(self) -> list[tuple[str, str]]:
        return [(MASTER_ADDRESS, "master")] + [(r.address, r.minion_id) for r in self.relays]

    @property
    def master(self) -> relayctl.Relay:
        return self.hosts["master"]

    def relay(self, minion_id: str) -> relayctl.Relay:
        return self.hosts[minion_id]

    # --- DNS -----------------------------------------------------------------------

    def _setup_dns(self) -> None:
        """nsd on the master, authoritative for every relay domain (SOA, NS, A so far)."""
        self.master.run(
            "export DEBIAN_FRONTEND=noninteractive; apt-get -q update >/dev/null && "
            "apt-get -qy install --no-install-recommends nsd >/dev/null",
            timeout=600,
        )
        zones = "".join(
            f'zone:\n    name: "{name}"\n    zonefile: "{NSD_ZONES}/{name}.zone"\n'
            for name in [r.domain for r in self.relays if not r.ip_relay] + [REVERSE_ZONE]
        )
        self.master.write_file(
            "/etc/nsd/nsd.conf.d/lab.conf",
            # No zone database: the zone files are the truth, so a zone file taken away
            # is a zone no longer served (tests/lab/test_federation.py), not a stale copy.
            f'server:\n    database: ""\n    ip-address: {DNS_ADDRESS}\n'
            f"    ip-address: 127.0.0.1\n\n{zones}",
        )
        for relay in self.relays:
            if not relay.ip_relay:  # no zone: nothing the lab DNS could serve
                self.master.write_file(f"{NSD_ZONES}/{relay.domain}.zone", zone_file(relay, ""))
        # The hosting provider's part: reverse DNS for every named relay's address.
        self.master.write_file(f"{NSD_ZONES}/{REVERSE_ZONE}.zone", reverse_zone(self.relays))
        self.master.run("nsd-checkconf /etc/nsd/nsd.conf && systemctl restart nsd")

    def fill_dns(self) -> list[ZoneFill]:
        """Each relay's zone as its own ``GET /dns/zone`` proposes it, served by nsd (an IP
        relay's proposes nothing: tests/lab/test_fleet.py checks that)."""
        fills = []
        for relay in self.relays:
            if relay.ip_relay:
                continue
            api_zone = api_get(self.relay(relay.minion_id), "/dns/zone")
            text = zone_file(relay, api_zone)
            path = f"{NSD_ZONES}/{relay.domain}.zone"
            self.master.write_file(path, text)
            self.master.run(["nsd-checkzone", relay.domain, path])
            fills.append(ZoneFill(relay.domain, api_zone, text))
        # (Debian's reload goes through nsd-control, which needs keys the lab has no use for)
        self.master.run("nsd-checkconf /etc/nsd/nsd.conf && systemctl restart nsd")
        return fills

    # --- salt ----------------------------------------------------------------------

    def _check_minions(self, timeout: float = 120) -> None:
        """Every relay answers the master (their keys were accepted before boot)."""
        deadline = time.monotonic() + timeout
        wanted = {r.minion_id for r in self.relays}
        while True:
            returns = self.salt("*", "test.ping", timeout=10)
            answered = {m for m, ret in returns.items() if ret is True}
            if wanted <= answered:
                return
            if time.monotonic() > deadline:
                raise RelayError(f"minions do not answer the master: {sorted(wanted - answered)}")
            time.sleep(1)

    def write_pillar(
        self, settings: dict[str, dict] | None = None, overrides: dict[str, dict] | None = None
    ) -> None:
        """top.sls and one pillar file per relay, as README.md's master section shows.

        ``settings``: {minion id: chatmail.ini settings}; ``overrides``: {minion id: keys
        that replace the pillar's own under ``chatmail:``}.
        """
        settings, overrides = settings or {}, overrides or {}
        top = {"base": {r.minion_id: [f"relays.{r.minion_id}"] for r in self.relays}}
        self.master.write_file(f"{PILLAR_ROOT}/top.sls", json.dumps(top, indent=2))
        for relay in self.relays:
            pillar = relay_pillar(relay, **settings.get(relay.minion_id, {}))
            pillar["chatmail"].update(overrides.get(relay.minion_id, {}))
            self.master.write_file(
                f"{PILLAR_ROOT}/relays/{relay.minion_id}.sls",
                json.dumps(pillar, indent=2),
                mode="0600",
            )

    def salt(self, target: str, *args: str, timeout: float = SALT_TIMEOUT) -> dict:
        """``salt <target> <args>`` on the master: {minion id: return}, one JSON per minion."""
        res = self.master.run(
            ["salt", "--out=json", "--out-indent=-1", f"-t{timeout:.0f}", target, *args],
            check=False,
            timeout=timeout + 60,
        )
        returns: dict = {}
        decoder = json.JSONDecoder()
        text, pos = res.stdout, 0
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                break
            try:
                item, pos = decoder.raw_decode(text, pos)
            except ValueError:
                raise RelayError(
                    f"salt {target} {' '.join(args)}: unparsable output (rc {res.returncode}): "
                    f"{text[pos:pos + 2000]} {res.stderr[-2000:]}"
                ) from None
            returns.update(item)
        return returns

    def apply(self, target: str = "*", *args: str) -> dict[str, relayctl.ApplyResult]:
        """``salt <target> state.apply chatmail``: an ApplyResult per minion."""
        started = time.monotonic()
        returns = self.salt(target, "state.apply", "chatmail", *args)
        seconds = time.monotonic() - started
        results = {}
        for minion_id, ret in returns.items():
            result = relayctl.ApplyResult(0, seconds, raw=json.dumps(ret)[-5000:])
            if isinstance(ret, dict):
                result.states = ret
            else:
                result.returncode = 1
                result.errors = [str(e) for e in (ret if isinstance(ret, list) else [ret])]
            results[minion_id] = result
        return results


# --- host side ------------------------------------------------------------------------


def run(cmd: list[str], input: str | None = None, check: bool = True):
    res = subprocess.run(cmd, input=input, capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise RelayError(f"{shlex.join(cmd)} exited {res.returncode}: {res.stderr.strip()}")
    return res


def require_host() -> None:
    relayctl.require_tools()
    missing = [tool for tool in ("ip", "nft") if not shutil.which(tool)]
    if missing:
        raise RelayError(f"the lab needs {', '.join(missing)} (apt-get install iproute2 nftables)")


class LabCA:
    """A throw-away certificate authority (the host's openssl) for the lab's relays."""

    def __init__(self, directory: Path, create: bool = True):
        self.dir = directory
        self.cert, self.key = self.dir / "ca.crt", self.dir / "ca.key"
        if not create:
            return
        self.dir.mkdir(mode=0o700, exist_ok=True)
        run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
            + ["-noenc", "-days", "7", "-subj", "/CN=chatmail lab CA"]
            + ["-keyout", str(self.key), "-out", str(self.cert)]
            + ["-addext", "basicConstraints=critical,CA:TRUE"]
            + ["-addext", "keyUsage=critical,keyCertSign,cRLSign"]
        )

    def issue(self, domain: str) -> tuple[bytes, bytes]:
        """(certificate, key) for the relay's names, as an ACME CA would issue them."""
        cert, key = self.dir / f"{domain}.crt", self.dir / f"{domain}.key"
        names = ",".join(f"DNS:{n}" for n in (domain, f"www.{domain}", f"mta-sts.{domain}"))
        run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
            + ["-noenc", "-days", "7", "-subj", f"/CN={domain}"]
            + ["-CA", str(self.cert), "-CAkey", str(self.key)]
            + ["-keyout", str(key), "-out", str(cert)]
            + ["-addext", f"subjectAltName={names}"]
            + ["-addext", "basicConstraints=critical,CA:FALSE"]
            + ["-addext", "extendedKeyUsage=serverAuth,clientAuth"]
        )
        return cert.read_bytes(), key.read_bytes()


def _destroy_quietly(host: relayctl.Relay) -> str:
    try:
        # a lab host is thrown away: no minute-long wait for a daemon that will not stop
        host.destroy(shutdown_timeout=15)
    except Exception as exc:  # teardown() retries from the state file
        return f"{host.name}: {exc}"
    return ""


def generate_keypair() -> tuple[str, str]:
    """A minion's RSA key pair (PEM private, PEM public), made with the host's openssl."""
    private = run(["openssl", "genrsa", "2048"]).stdout
    public = run(["openssl", "rsa", "-pubout"], input=private).stdout
    return private, public


def resolve_mirrors() -> dict[str, str]:
    """One IPv4 address per mirror name, resolved once on the host for the whole lab."""
    try:
        return {
            name: socket.getaddrinfo(name, 443, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
            for name in MIRROR_NAMES
        }
    except OSError as exc:
        raise RelayError(f"cannot resolve the package mirrors {MIRROR_NAMES}: {exc}") from None


def nft_ruleset(mirrors: dict[str, str], routing_was_off: bool) -> str:
    """Our own table: deleting it removes every rule the lab added."""
    elements = ", ".join(sorted(set(mirrors.values())))
    ports = ", ".join(map(str, MIRROR_PORTS))
    # With forwarding off before the lab, nothing but the lab may be routed now either.
    others = "        drop\n" if routing_was_off else ""
    return f"""table ip {NFT_TABLE} {{
    comment "chatmail test lab (scripts/lib/lab.py): removed when the lab stops"
    set mirrors {{
        type ipv4_addr
        elements = {{ {elements} }}
    }}
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "{BRIDGE}" ct state established,related accept
        iifname "{BRIDGE}" drop comment "the lab does not reach the host's services"
    }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        iifname "{BRIDGE}" oifname "{BRIDGE}" accept
        iifname "{BRIDGE}" ip daddr @mirrors tcp dport {{ {ports} }} accept comment "apt, pip"
        oifname "{BRIDGE}" ct state established,related accept
        iifname "{BRIDGE}" drop comment "nothing else leaves the lab"
        oifname "{BRIDGE}" drop
{others}    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        ip saddr {LAB_SUBNET} oifname != "{BRIDGE}" masquerade comment "chatmail-lab"
    }}
}}
"""


def teardown(state: dict, state_file: Path = STATE_FILE) -> None:
    """Remove what ``state`` records (containers first), whatever of it still exists."""
    for name, root in state.get("hosts", {}).items():
        pidfile = Path(f"{root}.pid")
        host = relayctl.Relay(Path(root), name=f"cmlab-{name}", pidfile=pidfile)
        with contextlib.suppress(ValueError, FileNotFoundError):
            nspawn_pid = int(pidfile.read_text().split()[0])
            if nspawn_pid and relayctl.is_nspawn(nspawn_pid):
                host.attach(nspawn_pid)
        host.destroy()
    if state.get("netns"):
        run(["ip", "netns", "delete", state["netns"]], check=False)  # and its veth
    if state.get("netns_etc"):
        shutil.rmtree(state["netns_etc"], ignore_errors=True)
    for tree in ("source", "ca_dir"):
        if state.get(tree):
            relayctl.remove_tree(Path(state[tree]))
    if state.get("nft_table"):
        run(["nft", "delete", "table", "ip", state["nft_table"]], check=False)
    if state.get("bridge"):
        run(["ip", "link", "delete", state["bridge"]], check=False)
    if state.get("ip_forward_before") is not None:
        IP_FORWARD.write_text(state["ip_forward_before"] + "\n")
    state_file.unlink(missing_ok=True)


def remove_stale_lab() -> None:
    """A lab whose owner was killed (we hold the lock, so it is gone): remove its remains."""
    if not STATE_FILE.exists():
        return
    try:
        state = json.loads(STATE_FILE.read_text())
    except ValueError:
        state = {}
    log(f"removing a stale lab left by pid {state.get('owner')}")
    teardown(state)


# --- inside a host's root filesystem, before it boots ----------------------------------


def prepare_rootfs(
    root: Path, name: str, address: str, hosts: list[tuple[str, str]], mirrors: dict[str, str]
) -> None:
    """Static address via systemd-networkd, the lab DNS, pinned mirror addresses."""
    if ipaddress.ip_address(address) not in LAB_SUBNET:
        raise RelayError(f"{address} is not in the lab's {LAB_SUBNET}")
    network = root / "etc/systemd/network/50-lab.network"
    network.parent.mkdir(parents=True, exist_ok=True)
    network.write_text(
        "[Match]\nName=host0\n\n[Network]\n"
        f"Address={address}/{LAB_SUBNET.prefixlen}\nGateway={HOST_ADDRESS}\n"
        f"DNS={DNS_ADDRESS}\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n"
    )
    networkd = root / "lib/systemd/system/systemd-networkd.service"
    if not networkd.exists():
        raise RelayError(f"no systemd-networkd in {root}: the base rootfs lacks it")
    for unit, target in (
        ("systemd-networkd.service", "multi-user.target.wants"),
        ("systemd-networkd.socket", "sockets.target.wants"),
    ):
        link = root / "etc/systemd/system" / target / unit
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(f"/lib/systemd/system/{unit}")
    (root / "etc/hostname").write_text(f"{name}\n")
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text(f"# the lab's DNS (scripts/lib/lab.py)\nnameserver {DNS_ADDRESS}\n")
    lines = ["127.0.0.1 localhost", f"{address} {name}"]
    lines += [f"{addr} {host}" for addr, host in hosts if host != name]
    lines += [f"{addr} {mirror_name}" for mirror_name, addr in mirrors.items()]
    (root / "etc/hosts").write_text("\n".join(lines) + "\n")


def write_file(root: Path, path: str, content: str | bytes, mode: int = 0o644) -> None:
    """A file in a host's root filesystem (before it boots), created with its final mode."""
    if isinstance(content, str):
        content = content.encode()
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(content)
    os.chmod(target, mode)  # whatever the umask


def write_unit(root: Path, name: str, exec_start: str) -> None:
    unit = root / f"etc/systemd/system/{name}.service"
    unit.write_text(
        f"[Unit]\nDescription={name} (lab)\nAfter=network-online.target\n"
        f"Wants=network-online.target\n\n[Service]\nExecStart={exec_start}\n"
        "Restart=on-failure\n\n[Install]\nWantedBy=multi-user.target\n"
    )
    link = root / f"etc/systemd/system/multi-user.target.wants/{name}.service"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(f"/etc/systemd/system/{name}.service")


# --- relays ----------------------------------------------------------------------------


def relay_pillar(relay: RelaySpec, **settings: object) -> dict:
    pillar = relayctl.local_relay_pillar(relay.domain, mta=relay.mta, **settings)
    pillar["chatmail"]["dns_forwarder"] = DNS_ADDRESS
    if relay.lab_ca_cert:
        pillar["chatmail"]["tls"] = {"mode": "external", "cert": RELAY_CERT, "key": RELAY_KEY}
    return pillar


def zone_file(relay: RelaySpec, api_zone: str) -> str:
    """SOA, NS and the relay's A record, then what its API proposes (if anything yet)."""
    head = zone_head(f"{relay.domain}.")
    if not api_zone:
        return head + f"@ IN A {relay.address}\n"
    return head + api_zone


def zone_head(origin: str) -> str:
    return (
        f"$ORIGIN {origin}\n$TTL 60\n"
        f"@ IN SOA ns.{origin} hostmaster.{origin} {int(time.time())} 60 60 600 60\n"
        f"@ IN NS ns.{origin}\n"
        f"ns IN A {DNS_ADDRESS}\n"
    )


def reverse_zone(relays: list[RelaySpec]) -> str:
    """PTR records for the relays with names (an IP relay has none to point to)."""
    origin = f"{REVERSE_ZONE}."
    records = "".join(
        f"{ipaddress.ip_address(r.address).reverse_pointer}. IN PTR {r.domain}.\n"
        for r in relays
        if not r.ip_relay
    )
    return zone_head(origin) + records


def monitor_token(host: relayctl.Relay) -> str:
    tokens = json.loads(host.read_file("/etc/chatmail/api-tokens.json"))
    ((_, token),) = tokens["monitor"].items()
    return token


def api_get(host: relayctl.Relay, path: str) -> str:
    """GET on the relay's control API (loopback), with its monitor token."""
    script = (
        "import sys, urllib.request\n"
        "req = urllib.request.Request('http://127.0.0.1:8077' + sys.argv[1],"
        " headers={'Authorization': 'Bearer ' + sys.stdin.read().strip()})\n"
        "sys.stdout.write(urllib.request.urlopen(req, timeout=60).read().decode())\n"
    )
    return host.run(["python3", "-c", script, path], input=monitor_token(host)).stdout


# --- CLI ---------------------------------------------------------------------------------


def default_relays() -> list[RelaySpec]:
    # Not under .test: unbound serves test. (like invalid. and onion.) as an empty local
    # zone by default, so the relays' resolvers would never ask the lab DNS.
    return [
        RelaySpec("relay1", "relay1.lab.example", "bookworm", "postfix", "198.18.0.11"),
        RelaySpec("relay2", "relay2.lab.example", "trixie", "opensmtpd", "198.18.0.12"),
        RelaySpec("relay3", "_relay3.lab.example", "trixie", "postfix", "198.18.0.13"),
        # an IP-address relay (mail_domain its address): Postfix only, as upstream
        RelaySpec("relay4", "198.18.0.14", "bookworm", "postfix", "198.18.0.14"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lab", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("up", "destroy"))
    parser.add_argument("--no-apply", action="store_true", help="boot only (keys accepted)")
    args = parser.parse_args(argv)
    lab = Lab(default_relays())
    if args.command == "destroy":
        with open(LOCK_PATH, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            remove_stale_lab()
        return 0

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        try:
            lab.create()
            lab.write_pillar()
            if not args.no_apply:
                results = lab.apply()
                for minion_id, result in sorted(results.items()):
                    print(f"{minion_id}: {result.summary()}", file=sys.stderr)
                lab.fill_dns()
            log(f"lab is up (state: {STATE_FILE}); Ctrl-C removes it")
        except RelayError as exc:
            log(f"error: {exc}\nthe lab stays for inspection; Ctrl-C removes it")
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        lab.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
