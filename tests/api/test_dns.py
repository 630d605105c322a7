"""/dns and /dns/zone against a real NSD serving test zones, plus a local HTTPS policy."""

from __future__ import annotations

import http.server
import ssl
import subprocess
import threading
from pathlib import Path
from typing import ClassVar

import pytest
from api_support import MONITOR, free_port, make_cert
from chatmail_api.app import create_app
from chatmail_api.dnscheck import (
    Expected,
    dkim_key_from_txt,
    judge,
    parse_mta_sts_policy,
    quote_txt,
)
from dnsserver import DNSServer, txt_strings
from fastapi.testclient import TestClient

GOOD_POLICY = "version: STSv1\nmode: enforce\nmx: {d}\nmax_age: 2419200\n"
BAD_POLICY = "version: STSv1\nmode: testing\nmx: mail.elsewhere.example\nmax_age: 60\n"


@pytest.fixture(scope="module")
def dkim_keys(tmp_path_factory) -> dict[str, Path]:
    """Two real opendkim-genkey key pairs: ``good`` is the relay's, ``other`` is not."""
    out = {}
    for name in ("good", "other"):
        directory = tmp_path_factory.mktemp(f"dkim-{name}")
        subprocess.run(
            ["opendkim-genkey", "-D", str(directory), "-d", "ok.example", "-s", "opendkim"],
            check=True,
        )
        out[name] = directory
    return out


def public_key(directory: Path) -> str:
    return dkim_key_from_txt((directory / "opendkim.txt").read_text())


class PolicyHandler(http.server.BaseHTTPRequestHandler):
    policies: ClassVar[dict[str, str]] = {}

    def do_GET(self):
        host = self.headers.get("Host", "")
        body = self.policies.get(host)
        if body is None or self.path != "/.well-known/mta-sts.txt":
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        kind = "text/html" if host.startswith("mta-sts.wrong.") else "text/plain; charset=utf-8"
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def policy_server(tmp_path_factory):
    """HTTPS on 127.0.0.1 with a self-signed certificate for every mta-sts.<zone>."""
    directory = tmp_path_factory.mktemp("mta-sts")
    names = [f"mta-sts.{z}" for z in ("ok.example", "missing.example", "wrong.example")]
    cert = make_cert(directory / "cert.pem", 30, names, key_path=directory / "key.pem")
    PolicyHandler.policies = {
        "mta-sts.ok.example": GOOD_POLICY.format(d="ok.example"),
        "mta-sts.wrong.example": BAD_POLICY,
    }
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), PolicyHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, directory / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], cert
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def nsd(tmp_path_factory, dkim_keys):
    good = txt_strings(f"v=DKIM1;k=rsa;p={public_key(dkim_keys['good'])};s=email;t=s")
    other = txt_strings(f"v=DKIM1; k=rsa; p={public_key(dkim_keys['other'])}")
    with DNSServer(tmp_path_factory.mktemp("nsd")) as server:
        server.set_zone(
            "ok.example",
            [
                "ns A 127.0.0.1",
                "@ A 127.0.0.1",
                "@ MX 10 ok.example.",
                '_mta-sts TXT "v=STSv1; id=202601010000"',
                "mta-sts CNAME ok.example.",
                "www CNAME ok.example.",
                f"opendkim._domainkey TXT {good}",
                '@ TXT "v=spf1 a ~all"',
                '_dmarc TXT "v=DMARC1;p=reject;adkim=s;aspf=s"',
                '@ CAA 0 issue "letsencrypt.org"',
                '_adsp._domainkey TXT "dkim=discardable"',
                "_submission._tcp SRV 0 1 587 ok.example.",
                "_submissions._tcp SRV 0 1 465 ok.example.",
                "_imap._tcp SRV 0 1 143 ok.example.",
                "_imaps._tcp SRV 0 1 993 ok.example.",
            ],
        )
        server.set_zone("missing.example", ["ns A 127.0.0.1", "@ A 127.0.0.1"])
        server.set_zone(
            "wrong.example",
            [
                "ns A 127.0.0.1",
                "@ A 127.0.0.1",
                "@ MX 10 mx.elsewhere.example.",
                '_mta-sts TXT "v=STSv1; id=1"',
                "mta-sts CNAME wrong.example.",
                "www CNAME elsewhere.example.",
                f"opendkim._domainkey TXT {other}",
                '@ TXT "v=spf1 a ~all"',
                '@ TXT "v=spf1 mx -all"',
                '_dmarc TXT "v=DMARC1;p=none"',
                '@ CAA 0 issue "pki.goog"',
                "_submission._tcp SRV 0 1 25 wrong.example.",
            ],
        )
        server.set_zone("noaddr.example", ["ns A 127.0.0.1", "@ MX 10 noaddr.example."])
        server.set_zone("127.in-addr.arpa", ["1.0.0 PTR ok.example."])
        yield server


@pytest.fixture
def dns_app(api_settings, make_config, nsd, policy_server, dkim_keys):
    def build(domain: str, ini: dict | None = None, **dns_overrides) -> TestClient:
        port, cafile = policy_server
        dns_settings = {
            "resolver": nsd.address,
            "authoritative_port": nsd.port,
            "timeout_s": 2,
            "dkim_txt": str(dkim_keys["good"] / "none.txt"),
            "dkim_private_key": str(dkim_keys["good"] / "opendkim.private"),
            "mta_sts_port": port,
            "mta_sts_cafile": str(cafile),
            **dns_overrides,
        }
        settings, _ = api_settings(dns=dns_settings)
        config = make_config(domain, **(ini or {}))
        return TestClient(create_app(settings, config))

    return build


def rows(report: dict) -> dict[tuple[str, str], dict]:
    return {(r["type"], r["name"]): r for r in report["records"]}


def test_all_records_ok(dns_app):
    client = dns_app("ok.example")
    response = client.get("/dns", headers=MONITOR)
    assert response.status_code == 200
    report = response.json()
    assert report["nameservers"] == ["127.0.0.1"]
    bad = [r for r in report["records"] if r["state"] != "ok"]
    assert bad == [] and report["problems"] == []
    assert report["ok"] is True
    assert report["mta_sts"]["state"] == "ok"
    dkim = rows(report)[("TXT", "opendkim._domainkey.ok.example.")]
    assert len(dkim["found"][0].split('" "')) >= 2  # the key really spans several strings
    assert rows(report)[("PTR", "1.0.0.127.in-addr.arpa.")]["state"] == "ok"


def test_missing_records_all_reported(dns_app):
    report = dns_app("missing.example").get("/dns", headers=MONITOR).json()
    states = {key: r["state"] for key, r in rows(report).items()}
    assert states[("A", "missing.example.")] == "ok"
    for key in [
        ("MX", "missing.example."),
        ("TXT", "_mta-sts.missing.example."),
        ("CNAME", "mta-sts.missing.example."),
        ("CNAME", "www.missing.example."),
        ("TXT", "opendkim._domainkey.missing.example."),
        ("TXT", "_dmarc.missing.example."),
        ("SRV", "_imaps._tcp.missing.example."),
    ]:
        assert states[key] == "missing", key
    assert report["ok"] is False
    assert report["mta_sts"]["state"] == "missing"
    # every problem at once, required ones first
    problems = report["problems"]
    assert len(problems) >= 12
    kinds = [p.split(":")[0] for p in problems]
    assert kinds == sorted(kinds, key=lambda k: k != "required")
    assert any(p.startswith("required: MX missing.example. is missing") for p in problems)


def test_self_signed_ordinary_domain_needs_no_mta_sts_or_caa(dns_app):
    """``tls: mode: self`` on a normal domain: no policy is served, no CA issues."""
    report = dns_app("missing.example", ini={"tls_mode": "self"}).get("/dns", headers=MONITOR)
    report = report.json()
    types = {(r["type"], r["name"]) for r in report["records"]}
    assert ("CNAME", "mta-sts.missing.example.") not in types
    assert ("TXT", "_mta-sts.missing.example.") not in types
    assert not any(rtype == "CAA" for rtype, _ in types)
    assert report["mta_sts"] is None
    assert ("MX", "missing.example.") in types  # the rest is still checked


def test_wrong_records(dns_app):
    report = (
        dns_app("wrong.example", expected_ipv4=["127.0.0.9"]).get("/dns", headers=MONITOR).json()
    )
    states = {key: r["state"] for key, r in rows(report).items()}
    assert states[("A", "wrong.example.")] == "wrong"
    assert states[("MX", "wrong.example.")] == "wrong"
    assert states[("CNAME", "www.wrong.example.")] == "wrong"
    assert states[("TXT", "opendkim._domainkey.wrong.example.")] == "wrong"
    assert states[("TXT", "_dmarc.wrong.example.")] == "wrong"
    assert states[("CAA", "wrong.example.")] == "wrong"
    assert states[("SRV", "_submission._tcp.wrong.example.")] == "wrong"
    spf = rows(report)[("TXT", "wrong.example.")]
    assert spf["state"] == "wrong" and len(spf["found"]) == 2
    assert rows(report)[("PTR", "1.0.0.127.in-addr.arpa.")]["state"] == "wrong"
    policy = report["mta_sts"]
    assert policy["state"] == "wrong"
    assert any("mode is 'testing'" in p for p in policy["problems"])
    assert any("does not cover wrong.example" in p for p in policy["problems"])
    assert any("max_age 60" in p for p in policy["problems"])
    assert any("'text/html', must be text/plain" in p for p in policy["problems"])
    assert report["ok"] is False
    found = rows(report)[("MX", "wrong.example.")]["found"]
    assert found == ["10 mx.elsewhere.example."]


def test_no_address_at_all(dns_app):
    report = dns_app("noaddr.example").get("/dns", headers=MONITOR).json()
    address = rows(report)[("A", "noaddr.example.")]
    assert address["state"] == "missing" and address["required"]
    assert address["why"] == "Missing A and/or AAAA DNS records"
    assert rows(report)[("MX", "noaddr.example.")]["state"] == "ok"
    assert report["ok"] is False and report["problems"][0].startswith("required: A")


def test_untrusted_policy_certificate_is_a_problem(dns_app, tmp_path):
    other_ca = make_cert(tmp_path / "other.pem", 30, ["someone.else"])
    report = dns_app("ok.example", mta_sts_cafile=str(other_ca)).get("/dns", headers=MONITOR).json()
    assert report["mta_sts"]["state"] == "missing"
    assert "CERTIFICATE_VERIFY_FAILED" in report["mta_sts"]["problems"][0]
    assert report["ok"] is False


def test_dkim_from_opendkim_txt(dns_app, dkim_keys):
    report = (
        dns_app(
            "ok.example",
            dkim_txt=str(dkim_keys["good"] / "opendkim.txt"),
            dkim_private_key="/nonexistent",
        )
        .get("/dns", headers=MONITOR)
        .json()
    )
    assert rows(report)[("TXT", "opendkim._domainkey.ok.example.")]["state"] == "ok"


def test_status_shows_dns_after_a_check(dns_app):
    client = dns_app("missing.example")
    client.get("/dns", headers=MONITOR)
    checks = {c["id"]: c for c in client.get("/status", headers=MONITOR).json()["checks"]}
    assert checks["dns.required"]["state"] == "fail"
    assert "MX missing.example. missing" in checks["dns.required"]["summary"]
    assert checks["dns.recommended"]["state"] == "fail"


def test_zone_file(dns_app, dkim_keys):
    response = dns_app("ok.example").get("/dns/zone", headers=MONITOR)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/dns")
    lines = response.text.splitlines()
    assert lines[0] == "; Required DNS entries"
    assert f"{'ok.example.':<40} {3600:<6} IN  {'A':<5}  127.0.0.1" in lines
    assert f"{'ok.example.':<40} {3600:<6} IN  {'MX':<5}  10 ok.example." in lines
    assert any('"v=STSv1; id=202601010000"' in line for line in lines)
    dkim = next(line for line in lines if line.startswith("opendkim._domainkey"))
    value = f"v=DKIM1;k=rsa;p={public_key(dkim_keys['good'])};s=email;t=s"
    assert dkim.endswith(quote_txt(value))
    assert all(len(chunk) <= 255 for chunk in dkim.split('"')[1::2])
    recommended = lines.index("; Recommended DNS entries")
    assert any("_dmarc.ok.example." in line for line in lines[recommended:])


def test_ipv4_relay_has_nothing_to_check(api_settings, make_config):
    settings, _ = api_settings()
    client = TestClient(create_app(settings, make_config("203.0.113.5")))
    report = client.get("/dns", headers=MONITOR).json()
    assert report["ok"] is True and report["records"] == [] and "IP address" in report["note"]


@pytest.mark.parametrize(
    "rtype,rdata,found,state",
    [
        ("MX", "10 d.", ["20 D."], "ok"),
        ("MX", "10 d.", [], "missing"),
        ("CNAME", "d.", ["e."], "wrong"),
        (
            "TXT",
            quote_txt("v=DKIM1;k=rsa;p=" + "A" * 400),
            ['"v=DKIM1; k=rsa; p=' + "A" * 200 + '" "' + "A" * 200 + '"'],
            "ok",
        ),
        ("TXT", '"v=spf1 a ~all"', ['"v=spf1 include:x -all"'], "wrong"),
        ("TXT", '"v=spf1 a ~all"', ['"v=spf1 mx -all"'], "ok"),
        ("TXT", '"v=DMARC1;p=reject;adkim=s;aspf=s"', ['"v=DMARC1; p=quarantine; adkim=s"'], "ok"),
        ("TXT", '"v=DMARC1;p=reject;adkim=s;aspf=s"', ['"v=DMARC1; p=reject"'], "wrong"),
        ("SRV", "0 1 993 d.", ["5 0 993 d."], "ok"),
        ("CAA", '0 issue "letsencrypt.org"', ['0 iodef "mailto:x"'], "ok"),
        ("A", "192.0.2.1", ["192.0.2.2"], "wrong"),
    ],
    ids=[
        "mx-pref-ignored",
        "mx-missing",
        "cname-wrong",
        "dkim-split",
        "spf-no-a",
        "spf-mx",
        "dmarc-quarantine",
        "dmarc-relaxed",
        "srv-priority-ignored",
        "caa-no-issue",
        "a-wrong",
    ],
)
def test_judge(rtype, rdata, found, state):
    assert judge(Expected("d.", rtype, rdata, True, ""), found) == state


@pytest.mark.parametrize(
    "policy,problem",
    [
        (GOOD_POLICY.format(d="d.example"), None),
        ("version: STSv1\r\nmode: enforce\r\nmx: *.example\r\nmax_age: 86400\r\n", None),
        ("version: STSv2\nmode: enforce\nmx: d.example\nmax_age: 86400\n", "version"),
        ("version: STSv1\nmode: none\nmx: d.example\nmax_age: 86400\n", "mode"),
        ("version: STSv1\nmode: enforce\nmax_age: 86400\n", "mx"),
        ("version: STSv1\nmode: enforce\nmx: d.example\nmax_age: soon\n", "max_age"),
        ("<html>not found</html>", "not a policy line"),
    ],
    ids=["good", "wildcard-crlf", "version", "mode", "no-mx", "max-age", "html"],
)
def test_policy_parsing(policy, problem):
    problems = parse_mta_sts_policy(policy, "d.example")
    if problem is None:
        assert problems == []
    else:
        assert problems and problem in problems[0]
