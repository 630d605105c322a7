"""The fleet lab: a salt master and four relay minions on a bridge of their own.

``scripts/lib/lab.py`` builds it: every host a systemd-nspawn container in its own network
namespace with an address from 198.18.0.0/15. The master applies the formula to relay1
(Debian 12, Postfix) and relay2 (Debian 13, OpenSMTPD), both with certificates from a lab
CA every host trusts, to relay3 (Debian 13, Postfix, a self-signed ``_`` domain) and to
relay4 (Debian 12, Postfix, the IP-address relay ``198.18.0.14``: addresses
``user@[198.18.0.14]``, self-signed); nsd on the master serves each named relay's zone as
its own ``GET /dns/zone`` proposes it. The lab
binds no host port, so it can run next to tests/e2e; it is removed after the last test of
this folder (also on Ctrl-C or SIGTERM), and a lab left by a killed run is removed by the
next one.

    .venv/bin/python -m pytest tests/lab -s     # ~3-5 min with cached base rootfs tarballs
    python3 scripts/lib/lab.py up [--no-apply]  # the same lab by hand, until Ctrl-C
    CHATMAIL_LAB_REUSE=1 .venv/bin/python -m pytest tests/lab/test_federation.py  # against it
"""

from __future__ import annotations

import os
import time

import pytest
from deltachat_rpc_client import DeltaChat

import lab as labctl
import relayctl
from fleetclient import start_lab_rpc


@pytest.fixture(scope="package")
def lab():
    """The booted lab: keys accepted, nsd serving SOA/NS/A, nothing applied yet."""
    if os.geteuid() != 0:
        pytest.fail("the lab needs root (systemd-nspawn, a bridge, nftables)")
    if os.environ.get("CHATMAIL_LAB_REUSE"):
        # Development loop: the lab `scripts/lib/lab.py up` keeps running, applied; it stays.
        yield labctl.Lab.attach(labctl.default_relays())
        return
    the_lab = labctl.Lab(labctl.default_relays())
    with relayctl.sigterm_as_interrupt():
        try:
            try:
                the_lab.create()
            except relayctl.RelayError as exc:
                pytest.fail(str(exc), pytrace=False)
            yield the_lab
        finally:
            started = time.monotonic()
            the_lab.destroy()
            the_lab.timings["teardown"] = time.monotonic() - started
            print(
                "\nlab timings: "
                + ", ".join(f"{k} {v:.0f} s" for k, v in the_lab.timings.items())
            )


@pytest.fixture(scope="package")
def fleet(lab):
    """The lab after `salt '*' state.apply chatmail` on the master; results in
    ``lab.first_apply`` ({minion id: ApplyResult})."""
    if os.environ.get("CHATMAIL_LAB_REUSE"):
        lab.first_apply = {}
        return lab
    lab.write_pillar()
    results = lab.apply()
    lab.timings["apply"] = max((r.seconds for r in results.values()), default=0)
    lab.first_apply = results
    summary = "\n".join(f"{m}: {r.summary()}" for m, r in sorted(results.items()))
    print(f"\nfleet apply from the master:\n{summary}")
    wanted = {r.minion_id for r in lab.relays}
    if set(results) != wanted or not all(r.ok for r in results.values()):
        pytest.fail(f"fleet apply failed (returns from {sorted(results)}):\n{summary}")
    for relay in lab.relays:
        for port in relayctl.PUBLIC_PORTS:
            lab.relay(relay.minion_id).wait_for_port(port, host=relay.address, timeout=90)
    return lab


@pytest.fixture(scope="package")
def dns_filled(fleet):
    """nsd serves every relay's zone as its API proposes it."""
    if os.environ.get("CHATMAIL_LAB_REUSE"):
        return fleet
    started = time.monotonic()
    fleet.zone_fills = fleet.fill_dns()
    fleet.timings["dns"] = time.monotonic() - started
    return fleet


@pytest.fixture(scope="package")
def client_netns(dns_filled):
    """The lab with its client namespace (``lab.client_prefix`` runs a program in it)."""
    dns_filled.client_prefix = dns_filled.add_client_netns()
    yield dns_filled
    if os.environ.get("CHATMAIL_LAB_REUSE"):  # the namespace is ours, the lab is not
        netns = {k: dns_filled.state[k] for k in ("netns", "netns_etc")}
        labctl.teardown(netns, state_file=labctl.STATE_DIR / "netns.json")


@pytest.fixture(scope="module")
def deltachat(client_netns, tmp_path_factory):
    """A deltachat-rpc-server in the lab's client namespace, one per test module."""
    rpc = start_lab_rpc(client_netns.client_prefix, tmp_path_factory.mktemp("dc"))
    try:
        yield DeltaChat(rpc)
    finally:
        rpc.close()
