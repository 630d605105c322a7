"""A salt master applies the formula to two relays of different MTAs, the lab DNS serves
their zones as their APIs propose them, and the relays exchange encrypted mail."""

from __future__ import annotations

import ipaddress
import json
import os
import time

import lab as labctl
import pytest
import relayctl
from fleetclient import Account, inbound_session, outbound_session
from relayclient import encrypted_mail, message_id

# The first test waits for the lab to boot and the first apply (minutes on a busy host).
pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]


# --- the lab's network ------------------------------------------------------------------


def test_hosts_have_own_network_namespace_and_only_lab_addresses(lab):
    host_netns = os.readlink("/proc/self/ns/net")
    for name, host in lab.hosts.items():
        assert os.readlink(f"/proc/{host.init_pid}/ns/net") != host_netns, name
        addresses = host.run(["hostname", "-I"]).stdout.split()
        assert addresses, name
        for address in addresses:
            assert ipaddress.ip_address(address) in labctl.LAB_RANGE, (name, address)
        resolv = host.read_file("/etc/resolv.conf")
        nameservers = [
            line.split()[1] for line in resolv.splitlines() if line.startswith("nameserver")
        ]
        if nameservers == ["127.0.0.1"]:  # an applied relay: its unbound asks the lab DNS
            forwards = host.run(["unbound-control", "list_forwards"]).stdout
            assert f"IN forward {labctl.DNS_ADDRESS}" in forwards, (name, forwards)
        else:
            assert nameservers == [labctl.DNS_ADDRESS], (name, resolv)


def _connects(host, address: str, port: int) -> bool:
    script = (
        "import socket, sys\n"
        "try:\n"
        "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    return host.run(["python3", "-c", script, address, str(port)], check=False).returncode == 0


def test_lab_reaches_only_the_lab_and_the_package_mirrors(lab):
    relay1 = lab.relay("relay1")
    assert _connects(relay1, labctl.MASTER_ADDRESS, 4506)  # the salt master
    assert _connects(relay1, "deb.debian.org", 80)  # pinned in /etc/hosts, through NAT
    outside_dns = relayctl.host_nameserver()
    if outside_dns:
        assert not _connects(relay1, outside_dns, 53)
    assert not _connects(relay1, "192.0.2.1", 25)  # nothing else is routed out
    assert not _connects(relay1, labctl.HOST_ADDRESS, 22)  # nor to the host's services


# --- the fleet -----------------------------------------------------------------------


def test_master_applies_the_formula_to_every_relay(fleet):
    for relay in fleet.relays:
        result = fleet.first_apply[relay.minion_id]
        assert result.ok, result.summary()
        assert len(result.states) > 50, result.summary()
        version = fleet.relay(relay.minion_id).read_file("/etc/os-release")
        assert f"VERSION_CODENAME={relay.suite}" in version
        mta = fleet.relay(relay.minion_id).run(
            ["systemctl", "is-active", relay.mta], check=False
        )
        assert mta.stdout.strip() == "active", (relay.minion_id, relay.mta)


def test_minions_have_no_local_copy_of_the_formula(fleet):
    for relay in fleet.relays:
        host = fleet.relay(relay.minion_id)
        assert host.run(["test", "-e", labctl.MASTER_CHECKOUT], check=False).returncode != 0


# --- DNS ------------------------------------------------------------------------------


def test_lab_dns_serves_each_relays_proposed_zone_and_every_check_is_ok(dns_filled):
    named = [r for r in dns_filled.relays if not r.ip_relay]
    assert [f.domain for f in dns_filled.zone_fills] == [r.domain for r in named]
    for fill in dns_filled.zone_fills:
        assert "MX" in fill.api_zone and "_domainkey" in fill.api_zone, fill.api_zone
    for relay in named:
        report = json.loads(labctl.api_get(dns_filled.relay(relay.minion_id), "/dns"))
        assert report["nameservers"] == [labctl.DNS_ADDRESS], report
        bad = [r for r in report["records"] if r["state"] != "ok"]
        assert report["ok"] and not bad, (relay.domain, report["problems"], bad)


def test_an_ip_relay_needs_no_dns_and_says_so(dns_filled):
    """No record can exist for an address: /dns checks nothing, /dns/zone proposes nothing,
    and the lab DNS serves no zone for it (lab.fill_dns skips it)."""
    (relay,) = [r for r in dns_filled.relays if r.ip_relay]
    host = dns_filled.relay(relay.minion_id)
    report = json.loads(labctl.api_get(host, "/dns"))
    assert report["ok"] and report["records"] == [] and not report["problems"], report
    assert report["note"] == f"{relay.domain} is an IP address: no DNS records to check"
    zone = labctl.api_get(host, "/dns/zone")
    assert zone == f"; {relay.domain} is an IP address: no DNS records needed\n", zone
    served = dns_filled.master.run(["ls", labctl.NSD_ZONES]).stdout.split()
    assert not [name for name in served if relay.domain in name], served


# --- federation -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def accounts(dns_filled) -> dict[str, Account]:
    """One account per relay, created by its first login."""
    created = {relay.minion_id: Account(relay) for relay in dns_filled.relays}
    for account in created.values():
        with account.imap():
            pass
    return created


#: How the sending MTA logs verified TLS (a lab-CA certificate for the recipient's name)
#: and encryption without verification (a _ domain's self-signed certificate).
TLS_LOG = {
    ("postfix", True): "Verified TLS connection established to",
    ("postfix", False): "Untrusted TLS connection established to",
    ("opensmtpd", True): 'cert-check result="valid"',
    ("opensmtpd", False): 'cert-check result="unverified"',
}


#: Postfix and OpenSMTPD both ways with verified TLS; each MTA to and from a _ domain and
#: the IP relay (user@[198.18.0.14]: no DNS, a self-signed certificate, no DKIM).
ROUTES = [
    ("relay1", "relay2"),
    ("relay2", "relay1"),
    ("relay1", "relay3"),
    ("relay3", "relay1"),
    ("relay2", "relay3"),
    ("relay1", "relay4"),
    ("relay4", "relay1"),
    ("relay2", "relay4"),
    ("relay4", "relay2"),
]


@pytest.mark.parametrize(("source", "destination"), ROUTES, ids=["->".join(r) for r in ROUTES])
def test_encrypted_message_crosses_between_relays(dns_filled, accounts, source, destination):
    """Over port 25 with TLS: verified for a relay with a lab-CA certificate, encryption
    without verification for a _ domain (upstream's rule)."""
    sender, recipient = accounts[source], accounts[destination]
    msgid = message_id(sender.relay.domain)
    started = time.monotonic()
    sender.send([recipient.addr], encrypted_mail(sender.addr, [recipient.addr], msgid))
    raw = recipient.wait_for(msgid)
    print(f"\n{source} -> {destination}: {time.monotonic() - started:.1f} s")
    assert b"-----BEGIN PGP MESSAGE-----" in raw
    received = inbound_session(
        dns_filled.relay(destination), recipient.relay.mta, sender.addr, recipient.addr
    )
    assert received, f"{destination} logged no SMTP session for {msgid}"
    assert any(sender.relay.address in line for line in received), received
    tls = ("TLS connection established from", " smtp tls ")  # Postfix, OpenSMTPD
    assert any(marker in line for line in received for marker in tls), received
    sent = outbound_session(dns_filled.relay(source), sender.relay.mta, recipient.addr)
    expected = TLS_LOG[(sender.relay.mta, recipient.relay.lab_ca_cert)]
    # Postfix's smtp process serves several deliveries: its line names the peer
    peer = f"[{recipient.relay.address}]" if sender.relay.mta == "postfix" else ""
    assert any(expected in line and peer in line for line in sent), (expected, sent)


# --- the fleet, again -------------------------------------------------------------------


def test_dry_run_after_apply_reports_no_change_and_nothing_pending(fleet):
    results = fleet.apply("*", "test=True")
    assert set(results) == {r.minion_id for r in fleet.relays}
    for minion_id, result in results.items():
        assert result.ok, result.summary()
        assert not result.changed, (minion_id, result.changed_summary())
        pending = [s["__id__"] for s in result.states.values() if s.get("result") is None]
        assert not pending, (minion_id, pending)


def test_a_relay_with_a_broken_pillar_fails_alone_and_keeps_serving(dns_filled):
    broken, *others = dns_filled.relays
    dns_filled.write_pillar(overrides={broken.minion_id: {"tls": {"mode": "letsencrypt"}}})
    results = dns_filled.apply()
    assert set(results) == {r.minion_id for r in dns_filled.relays}
    failed = results[broken.minion_id]
    assert not failed.ok, failed.summary()
    assert any("tls:mode must be acme, self or external" in e for e in failed.errors), failed.raw
    for relay in others:
        result = results[relay.minion_id]
        assert result.ok and not result.changed, (relay.minion_id, result.changed_summary())
    for port in (25, 993):  # the broken relay's daemons were not touched
        dns_filled.relay(broken.minion_id).wait_for_port(port, host=broken.address, timeout=5)


def test_pillar_change_on_the_master_reaches_every_relay_by_the_next_apply(dns_filled):
    size = "123M"
    dns_filled.write_pillar(
        {r.minion_id: {"max_mailbox_size": size} for r in dns_filled.relays}
    )
    results = dns_filled.apply()
    dns_filled.timings["reapply"] = max(r.seconds for r in results.values())
    for relay in dns_filled.relays:
        result = results[relay.minion_id]
        assert result.ok, result.summary()
        ini = dns_filled.relay(relay.minion_id).read_file("/usr/local/lib/chatmaild/chatmail.ini")
        assert f"max_mailbox_size = {size}" in ini.splitlines(), (relay.minion_id, ini)
