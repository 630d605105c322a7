"""An IP-address relay (mail_domain an IPv4 address, as upstream): addresses user@[IP],
Postfix's destination is the domain literal, its host name the reverse-DNS name, no DKIM
signing (no DNS to publish a key in), a self-signed certificate for the address; the
Postfix configs pass postconf, and every transport (HTTPS-first included) renders."""

from __future__ import annotations

import json
import re

import pytest
from saltsupport import RenderError
from test_render import CHECK_SCRIPT, postfix_dir, run

IP = "203.0.113.5"
PILLAR = {"chatmail": {"mail_domain": IP, "daemons": {"mxtransport": True}}}


@pytest.fixture(scope="module")
def ip_relay(render):
    return render("debian12", "ip-relay", pillar=PILLAR)


def test_map_derives_the_address_domain_and_host_name(ip_relay):
    m = ip_relay.map
    assert (m["address_domain"], m["mta_hostname"]) == (f"[{IP}]", "5.113.0.203.in-addr.arpa")
    assert m["tls"]["mode"] == "self" and m["dkim"]["enabled"] is False
    assert ip_relay.text("/etc/mailname").strip() == f"[{IP}]"


def test_postfix_delivers_the_domain_literal_locally_and_passes_postconf(
    ip_relay, tmp_path, test_cert
):
    main = ip_relay.text("/etc/postfix/main.cf")
    assert f"mydestination = [{IP}]\n" in main and f"myorigin = [{IP}]\n" in main
    assert "myhostname = 5.113.0.203.in-addr.arpa\n" in main
    assert "milters =" not in main and "_milters=" not in ip_relay.text("/etc/postfix/master.cf")
    d = postfix_dir(ip_relay, tmp_path, *test_cert)
    for kind, counterpart, candidate in (
        ("postfix-main", "master.cf", "main.cf"),
        ("postfix-master", "main.cf", "master.cf"),
    ):
        result = run(["sh", str(CHECK_SCRIPT), kind, str(d / counterpart), str(d / candidate)])
        assert result.returncode == 0 and result.stderr == "", (kind, result.stderr)


def test_self_signed_certificate_names_the_address(ip_relay):
    state = json.dumps(ip_relay.states["chatmail-tls-selfsigned"])
    assert f"subjectAltName=IP:{IP}" in state and "DNS:" not in state


def test_no_dkim_states(ip_relay):
    assert not [i for i in ip_relay.states if re.match(r"chatmail-dkim-", i)]


def test_opensmtpd_refuses_an_ip_address_domain(render):
    pillar = {"chatmail": {"mail_domain": IP, "mta": "opensmtpd"}}
    with pytest.raises(RenderError, match="IP-address mail_domain needs mta: postfix"):
        render("debian13", "ip-relay-smtpd", pillar=pillar)
