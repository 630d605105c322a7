"""The TURN state (salt/chatmail/turn): coturn's config, its drop-in, the secret helper.

coturn has no config validator (it logs unknown lines and starts anyway), so the rendered
config is checked here for what a public TURN server must have, and the container tests
(tests/e2e/test_turn_server.py) check coturn's own log and a real client against it.
"""

from __future__ import annotations

import ipaddress
import os
import stat
import subprocess

import pytest
from saltsupport import OPENBSD_GRAINS, REPO, RenderError, run

CHECK_SCRIPT = REPO / "salt" / "chatmail" / "files" / "chatmail-check-config"
HELPER = REPO / "salt" / "chatmail" / "turn" / "files" / "coturn-config"
DROPIN = "/etc/systemd/system/coturn.service.d/20-chatmail.conf"

#: Addresses no peer permission may reach: loopback, RFC 1918, link-local/cloud metadata,
#: CGNAT, multicast, and IPv6 forms of the same (mapped, NAT64, 6to4, ULA, link-local).
MUST_DENY = [
    "127.0.0.1",
    "127.255.0.1",
    "0.0.0.0",
    "10.1.2.3",
    "172.16.0.1",
    "172.31.255.254",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "198.18.0.1",
    "224.0.0.1",
    "255.255.255.255",
    "::1",  # (:: and 0.0.0.0 coturn refuses itself, as loopback: CVE-2020-26262)
    "::ffff:127.0.0.1",
    "64:ff9b::a00:1",
    "2002:7f00:1::1",
    "2001:0:4136:e378::1",
    "fd00::1",
    "fe80::1",
    "ff02::1",
]
MUST_ALLOW = ["9.9.9.9", "1.1.1.1", "172.32.0.1", "2a01:4f8::1", "2606:4700::1111"]


@pytest.fixture(scope="module")
def rendered(render):
    return render("debian12", "example")


def config_lines(rendered) -> list[str]:
    return [
        line
        for line in rendered.text(rendered.map["turn"]["config"]).splitlines()
        if line and not line.startswith("#")
    ]


def denied_ranges(lines: list[str]) -> list[tuple[ipaddress._BaseAddress, ipaddress._BaseAddress]]:
    ranges = []
    for line in lines:
        key, _, value = line.partition("=")
        if key == "denied-peer-ip":
            first, _, last = value.partition("-")
            first, last = ipaddress.ip_address(first), ipaddress.ip_address(last or first)
            assert first.version == last.version and first <= last, line
            ranges.append((first, last))
    return ranges


def test_coturn_config_for_the_relay(rendered):
    m = rendered.map
    lines = config_lines(rendered)
    for line in (
        f"listening-port={m['turn']['port']}",
        f"min-port={m['turn']['min_port']}",
        f"max-port={m['turn']['max_port']}",
        f"realm={m['mail_domain']}",
        "use-auth-secret",
        "no-tcp-relay",
        "no-cli",
        "no-multicast-peers",
        "no-software-attribute",
    ):
        assert line in lines, line
    assert not [line for line in lines if "secret=" in line or "allow-loopback" in line]
    assert not [line for line in lines if line.startswith(("user=", "lt-cred-mech", "no-auth"))]


@pytest.mark.parametrize("address", MUST_DENY)
def test_peer_is_denied(rendered, address):
    ip = ipaddress.ip_address(address)
    ranges = denied_ranges(config_lines(rendered))
    assert any(first.version == ip.version and first <= ip <= last for first, last in ranges)


@pytest.mark.parametrize("address", MUST_ALLOW)
def test_public_peer_is_not_denied(rendered, address):
    ip = ipaddress.ip_address(address)
    ranges = denied_ranges(config_lines(rendered))
    assert not any(first.version == ip.version and first <= ip <= last for first, last in ranges)


def test_no_denied_range_starts_at_the_unspecified_address(rendered):
    """coturn (4.6.1) reads a range starting at 0.0.0.0 or :: as "no lower bound" and orders
    IPv4 before IPv6, so ``::-::1`` denied every IPv4 peer (found with the real turnserver:
    9.9.9.9 got 403). An IPv4 range from 0.0.0.0 stays within IPv4; an IPv6 one may not
    start at :: (coturn refuses :: itself, as loopback, since CVE-2020-26262)."""
    ranges = denied_ranges(config_lines(rendered))
    assert not [(f, l) for f, l in ranges if f.version == 6 and f == ipaddress.IPv6Address("::")]


def test_external_ip_is_announced_and_denied_as_a_peer(render):
    pillar = {
        "chatmail": {
            "mail_domain": "chat.example.org",
            "turn": {"external_ip": "203.0.113.7/10.0.0.7"},
        }
    }
    lines = config_lines(render("debian12", "turn-nat", pillar=pillar))
    assert "external-ip=203.0.113.7/10.0.0.7" in lines
    assert "denied-peer-ip=203.0.113.7" in lines


def test_dropin_is_accepted_by_systemd(rendered, tmp_path):
    """The drop-in's lines on a stand-in coturn unit pass systemd-analyze verify."""
    text = rendered.text(DROPIN)
    limit = rendered.map["limits"]["coturn"]
    assert f"\nMemoryMax={limit['memory']}\n" in text and f"\nTasksMax={limit['tasks']}\n" in text
    assert f"LoadCredential=turn-secret:{rendered.map['turn']['secret_file']}" in text
    service = text.split("[Service]\n", 1)[1]
    # turnserver and the helper exist on a relay only: stand-ins with the same syntax
    service = service.replace("/usr/bin/turnserver", "/bin/true").replace(
        rendered.map["turn"]["config_helper"], "/bin/true"
    )
    candidate = tmp_path / "coturn.service"
    candidate.write_text(f"[Unit]\nDescription=stand-in\n[Service]\nType=notify\n{service}")
    result = run(["sh", str(CHECK_SCRIPT), "unit", "coturn.service", str(candidate)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_credentials_socket_is_for_vmail_only(rendered):
    m = rendered.map
    text = rendered.text("/etc/systemd/system/chatmail-turn-credentials.socket")
    assert f"ListenStream={m['settings']['turn_socket_path']}" in text
    assert "SocketUser=root" in text and f"SocketGroup={m['users']['vmail_group']}" in text
    assert "SocketMode=0660" in text
    service = rendered.text("/etc/systemd/system/chatmail-turn-credentials.service")
    for line in ("DynamicUser=yes", "PrivateNetwork=yes", "RestrictAddressFamilies=AF_UNIX"):
        assert line in service


def test_package_waits_for_config_secret_and_dropin(rendered):
    """The package's own first start must already run the relay's config."""
    pkg = rendered.states["chatmail-turn-pkg"]
    requires = str(pkg)
    for state in (
        "chatmail-turn-secret",
        "chatmail-turn-config",
        "chatmail-turn-config-helper",
        "chatmail-turn-units-reload",
    ):
        assert state in requires, state
    assert "chatmail-turn-coturn-dropin" in str(rendered.states["chatmail-turn-units-reload"])


def test_openbsd_renders_without_turn_and_refuses_to_enable_it(render):
    rendered = render("openbsd7", "example", grains=OPENBSD_GRAINS)
    assert rendered.map["turn"]["enabled"] is False
    assert not [i for i in rendered.states if i.startswith("chatmail-turn")]
    pillar = {"chatmail": {"mail_domain": "chat.example.org", "turn": {"enabled": True}}}
    with pytest.raises(RenderError, match="turn:enabled needs systemd"):
        render("openbsd7", "turn-on", pillar=pillar, grains=OPENBSD_GRAINS)


def test_turning_turn_off_stops_what_an_earlier_apply_started(render):
    pillar = {"chatmail": {"mail_domain": "chat.example.org", "turn": {"enabled": False}}}
    states = render("debian12", "turn-off", pillar=pillar).states
    assert "chatmail-turn-pkg" not in states
    assert "'dead'" in str(states["chatmail-turn-service"]["service"])


# -- the secret helper (coturn-config) -------------------------------------------------


def run_helper(tmp_path, secret: str) -> subprocess.CompletedProcess:
    config = tmp_path / "turnserver.conf"
    config.write_text("realm=x\n")
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret)
    return run(["sh", str(HELPER), str(config), str(secret_file), str(tmp_path / "out.conf")])


def test_helper_appends_the_secret_privately(tmp_path):
    result = run_helper(tmp_path, "ab12" * 16 + "\n")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out.conf"
    assert out.read_text() == f"realm=x\nstatic-auth-secret={'ab12' * 16}\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert not (tmp_path / "out.conf.tmp").exists()


@pytest.mark.parametrize(
    "secret",
    ["", "\n", "abc def", "abc\nrealm=evil"],
    ids=["empty", "newline", "blank", "injected-line"],
)
def test_helper_refuses_an_unusable_secret(tmp_path, secret):
    result = run_helper(tmp_path, secret)
    assert result.returncode == 1
    assert "empty or not alphanumeric" in result.stderr
    assert not (tmp_path / "out.conf").exists()


def test_helper_is_executable_in_the_checkout():
    assert os.access(HELPER, os.X_OK)
